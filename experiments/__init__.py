"""Experiments built on ogpsa_jax, one package or script each, run from the repository root:

    python -m experiments.demo --tiny        # or: ogpsa experiment demo --tiny
    python -m experiments.paper list
    python -m experiments.permuted_digits

They import the library; the library never imports them. See experiments/README.md.
"""
