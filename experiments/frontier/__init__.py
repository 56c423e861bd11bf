"""The alignment-tax frontier study: every method as a curve along its own knob, several seeds,
intervals, the dominated hypervolume and the capability at matched safety (docs/frontier.md).

``python -m experiments.frontier`` (or ``ogpsa experiment frontier``, ``make frontier``);
``--reduced`` is what results/frontier/ holds, ``--tiny`` the same code on the tiny model.
"""
