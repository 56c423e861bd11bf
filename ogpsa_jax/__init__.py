"""ogpsa_jax: Orthogonal Gradient Projection for Safety Alignment, in JAX.

Public names are re-exported here; everything else is private to its module.
"""

__version__ = "0.1.0"
