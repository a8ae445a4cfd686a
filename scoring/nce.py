"""NCE: the negative conditional entropy of target labels given source labels.

Tran, Nguyen & Hassner, "Transferability and Hardness of Supervised Classification Tasks",
ICCV 2019.

Each target sample also carries a source label z (in practice the argmax of the pre-trained head).
From the empirical joint P̂(y, z) of the N pairs, NCE = −H(Y | Z) = Σ_{y,z} P̂(y, z) log P̂(y | z) ≤ 0:
near 0 when the source label almost determines the target label (an easy transfer).

Dimension names: N samples, K source classes, C target classes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

from scoring import inputs


def nce_from_joint(joint_CK: jax.Array) -> jax.Array:
    """−H(Y | Z) from joint counts [C, K] (any positive scale; it is normalised here).

    Cells with P̂(y, z) = 0 contribute 0 (the limit p log p → 0), so empty source classes need no
    special case.
    """
    joint_CK = joint_CK / jnp.sum(joint_CK)
    marginal_K = jnp.sum(joint_CK, axis=0)
    cond_CK = joint_CK / jnp.where(marginal_K > 0, marginal_K, 1)[None, :]
    return jnp.sum(xlogy(joint_CK, cond_CK))


@functools.partial(jax.jit, static_argnames=("num_classes", "num_source_classes", "dtype"))
def _nce(source_N, labels_N, num_classes, num_source_classes, dtype):
    joint_CK = jnp.zeros((num_classes, num_source_classes), dtype).at[labels_N, source_N].add(1)
    return nce_from_joint(joint_CK)


def nce(
    source_labels,
    labels,
    *,
    num_classes: int | None = None,
    num_source_classes: int | None = None,
    dtype=None,
) -> jax.Array:
    """Negative conditional entropy −H(Y | Z) of target labels Y given source labels Z.

    NCE = Σ_{y,z} P̂(y, z) log (P̂(y, z) / P̂(z)), the empirical distributions of the N (y_i, z_i)
    pairs.

    Args:
        source_labels: [N] integer source labels z_i (e.g. `argmax` of the source head's outputs).
        labels: [N] integer target labels y_i.
        num_classes: optional number of target classes C (labels in [0, C)); required inside
          `jax.jit`. Without it the classes are the distinct values present.
        num_source_classes: likewise for the source labels (K). Empty classes change nothing.
        dtype: float dtype to compute in; default float64 when x64 is on, else float32.

    Returns:
        [] the NCE score, ≤ 0 (higher means more transferable).

    Raises:
        TypeError: non-integer labels.
        ValueError: wrong shapes, mismatched lengths, fewer than 2 target classes, labels outside
          the given class ranges.

    References:
        Tran et al., "Transferability and Hardness of Supervised Classification Tasks",
        ICCV 2019, Eq. (3)–(4).
    """
    if isinstance(source_labels, list | tuple):
        source_labels = np.asarray(source_labels)
    shape = np.shape(source_labels)
    if len(shape) != 1:
        raise ValueError(f"source_labels must have shape [N]; got shape {shape}")
    num_samples = shape[0]
    labels = inputs.check_labels(labels, num_samples, num_classes=num_classes)
    source = _check_source_labels(source_labels, num_samples, num_source_classes)
    dtype = inputs.compute_dtype(jnp.float64 if dtype is None else dtype)
    return _nce(source.index, labels.index, labels.num_classes, source.num_classes, dtype)


def _check_source_labels(source_labels, num_samples, num_source_classes) -> inputs.Labels:
    """Like `inputs.check_labels`, but a single source class is allowed (NCE is then −H(Y))."""
    if num_source_classes is None and not inputs.is_traced(source_labels):
        if jnp.issubdtype(source_labels.dtype, jnp.integer):
            values = np.unique(np.asarray(source_labels))  # on the host: no compile per shape
            if values.size == 1:
                index = jnp.zeros(num_samples, jnp.int32)
                return inputs.Labels(index, np.asarray(values), 1)
    if num_source_classes == 1:
        num_source_classes = 2  # an extra empty class: same joint, passes the ≥ 2 rule
    return inputs.check_labels(
        source_labels,
        num_samples,
        num_classes=num_source_classes,
        name="source_labels",
        expect_range=False,  # a source head's argmax classes have gaps
    )
