"""LEEP: the log expected empirical prediction of a pre-trained classifier on a target task.

Nguyen, Hassner, Seeger & Archambeau, "LEEP: A New Measure to Evaluate Transferability of Learned
Representations", ICML 2020.

The source model's softmax θ(x) [K] over its own K classes is turned into a target classifier
without training: the empirical joint P̂(y, z) = 1/N Σ_i θ(x_i)_z [y_i = y] gives the conditional
P̂(y | z) = P̂(y, z) / P̂(z), and the "expected empirical predictor" p(y | x) = Σ_z P̂(y | z) θ(x)_z.
LEEP is its mean log-likelihood on the target data, 1/N Σ_i log p(y_i | x_i) ≤ 0; higher is better.

Dimension names: N samples, K source classes, C target classes.
"""

import functools

import jax
import jax.numpy as jnp

from scoring import inputs

# Source probabilities may come out of a float32 softmax: rows must sum to 1 within this.
_ROW_SUM_TOL = 1e-3


@jax.jit
def _probability_violations(probs_NK) -> tuple[jax.Array, jax.Array]:
    """(number of negative entries, worst |row sum − 1|): one program, not op by op."""
    return jnp.count_nonzero(probs_NK < 0), jnp.max(jnp.abs(jnp.sum(probs_NK, axis=1) - 1))


def check_source_probs(source_probs, name: str = "source_probs") -> jax.Array:
    """Checks [N, K] source-class probabilities: finite, ≥ 0, rows summing to 1.

    Args:
        source_probs: [N, K] softmax outputs of the source model's head.
        name: the argument's name, for error messages.

    Returns:
        [N, K] array in its compute dtype.

    Raises:
        TypeError, ValueError: see `inputs.check_features`; also negative entries or rows whose sum
          differs from 1 by more than 1e-3 (logits passed instead of probabilities).
    """
    probs_NK = inputs.check_features(source_probs, name=name, min_samples=1)
    if not inputs.is_traced(probs_NK):
        negative, worst = _probability_violations(probs_NK)
        if negative:
            raise ValueError(
                f"{name} must be probabilities ≥ 0 (apply softmax to logits); found "
                f"{int(negative)} negative entries"
            )
        if float(worst) > _ROW_SUM_TOL:
            raise ValueError(
                f"{name} rows must sum to 1 (softmax outputs); the worst row is off by "
                f"{float(worst):.3g}"
            )
    return probs_NK


def conditional_from_joint(joint_CK: jax.Array) -> jax.Array:
    """P̂(y | z) [K, C] from the (unnormalised) joint [C, K]; a source class z that no sample
    puts mass on (P̂(z) = 0) gets an all-zero row, since θ(x)_z = 0 for every x then."""
    marginal_K = jnp.sum(joint_CK, axis=0)
    return (joint_CK / jnp.where(marginal_K > 0, marginal_K, 1)[None, :]).T


def expected_log_likelihood(probs_NK, labels_N, cond_KC) -> jax.Array:
    """Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z over the rows given (a sum, not a mean)."""
    # Only the column of each sample's own label is needed: gather P̂(y_i | ·) [N, K], then dot.
    likelihood_N = jnp.sum(probs_NK * cond_KC.T[labels_N], axis=1)
    return jnp.sum(jnp.log(likelihood_N))


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _leep(probs_NK, labels_N, num_classes):
    joint_CK = jax.ops.segment_sum(probs_NK, labels_N, num_segments=num_classes)
    cond_KC = conditional_from_joint(joint_CK)
    return expected_log_likelihood(probs_NK, labels_N, cond_KC) / probs_NK.shape[0]


def leep(source_probs, labels, *, num_classes: int | None = None) -> jax.Array:
    """LEEP score of a pre-trained classifier for a target labelling.

    LEEP = 1/N Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z, with P̂(y | z) the empirical conditional of the
    target label given the source class, estimated from the same data (module docstring).

    Computes in the dtype of `source_probs` (float64 when x64 is on and float64 is passed).

    Args:
        source_probs: [N, K] probabilities θ(x_i) of the source model's K classes (softmax outputs),
          rows summing to 1.
        labels: [N] integer target labels; classes are the distinct values present, or
          0..num_classes-1 when `num_classes` is given (required inside `jax.jit`).
        num_classes: optional number of target classes C.

    Returns:
        [] the LEEP score, ≤ 0 (higher means more transferable).

    Raises:
        TypeError: non-array input or non-integer labels.
        ValueError: wrong shapes, fewer than 2 classes, NaN/inf, negative probabilities or rows
          not summing to 1.

    References:
        Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned
        Representations", ICML 2020, Eq. (2)–(3).
    """
    probs_NK = check_source_probs(source_probs)
    labels = inputs.check_labels(labels, probs_NK.shape[0], num_classes=num_classes)
    return _leep(probs_NK, labels.index, labels.num_classes)
