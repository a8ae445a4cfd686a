"""Known-answer data for transferability scores: the same classes, far apart and nearly coincident."""

import numpy as np


def separated_and_overlapping(seed, n, d, c, far, near):
    """Features [N, D] twice, with one set of labels [N] and one noise draw.

    Class centres (standard normal) are scaled by `far` in the first set, so the classes barely
    overlap, and by `near` in the second, so they nearly coincide: every score must rank the
    first above the second.

    Returns:
        (separated [N, D], overlapping [N, D], labels [N]).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    noise = rng.normal(size=(n, d))
    centers = rng.normal(size=(c, d))
    return noise + far * centers[labels], noise + near * centers[labels], labels
