"""LogME: the log maximum evidence of a Bayesian linear model on frozen features.

You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021;
You et al., "Ranking and Tuning Pre-trained Models: A New Paradigm for Exploiting Model Hubs",
JMLR 2022 (the fixed-point algorithm used here).

For each target column y the model is y ~ N(F w, 1/β), w ~ N(0, 1/α). LogME maximises the evidence
p(y | F, α, β) over α, β with MacKay's fixed point and reports log p / N; the score is the mean over
columns (one column per class for classification, one-hot coded). A higher score means the features
fit the task better with a linear head, which predicts fine-tuned accuracy.

All the work that depends on F is one eigendecomposition: of the Gram matrix FᵀF [D, D] when N ≥ D,
or of the kernel FFᵀ [N, N] when N < D. The target columns are projected onto the eigenvectors in one
matrix product, and the per-column fixed point (a few O(K) steps each) runs batched with `vmap`.

Dimension names: N samples, D feature dimensions, C target columns, K = length of the computed
spectrum (D on the Gram path, N on the kernel path).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from scoring import inputs

# Matrix products run at full float32/float64 precision: TPUs (bfloat16 passes) and GPUs (TF32)
# would otherwise lose the small eigenvalues LogME depends on.
_HIGHEST = jax.lax.Precision.HIGHEST


class LogMEResult(NamedTuple):
    """The outcome of `logme` (a pytree, so it passes through `jax.jit`).

    Attributes:
        score: [] mean over the C columns of `evidence`.
        evidence: [C] log maximum evidence of each target column, divided by N.
        alpha: [C] prior precision α of the weights at the fixed point.
        beta: [C] noise precision β at the fixed point.
        weights: [C, D] posterior mean m of the weights of each column.
    """

    score: jax.Array
    evidence: jax.Array
    alpha: jax.Array
    beta: jax.Array
    weights: jax.Array


def _fixed_point(eig_K, proj2_K, res_out, num_samples, dim, eps, tol, max_iter):
    """MacKay's fixed point for one target column.

    Args:
        eig_K: [K] eigenvalues of FᵀF (those at or below the cutoff set to 0).
        proj2_K: [K] squared coordinates (u_kᵀ y)² of y on the left singular vectors u_k.
        res_out: [] ‖y‖² outside the span of those u_k.
        num_samples: N.
        dim: D (static).
        eps, tol, max_iter: see `logme`.

    Returns:
        (alpha, beta, t, evidence): t = α/β of the last step's input, the value the posterior mean
        is taken at (as in the reference); evidence is log p(y | F, α, β) / N.
    """
    dtype = eig_K.dtype

    def step(state):
        i, alpha, beta, *_ = state
        t = alpha / beta
        shrink_K = t / (t + eig_K)  # 1 − s/(s+t), the part of each coordinate the prior removes
        gamma = jnp.sum(eig_K / (t + eig_K))  # effective number of parameters
        m2 = jnp.sum(eig_K * proj2_K / (t + eig_K) ** 2)  # ‖m‖²
        res2 = jnp.sum(proj2_K * shrink_K**2) + res_out  # ‖F m − y‖²
        alpha_new = gamma / (m2 + eps)
        beta_new = (num_samples - gamma) / (res2 + eps)
        done = jnp.abs(alpha_new / beta_new - t) / t <= tol
        return i + 1, alpha_new, beta_new, t, m2, res2, done

    def not_done(state):
        i, *_, done = state
        return (i < max_iter) & ~done

    one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
    init = (jnp.zeros((), jnp.int32), one, one, one, zero, zero, jnp.zeros((), bool))
    _, alpha, beta, t, m2, res2, _ = jax.lax.while_loop(not_done, step, init)
    # Eigenvalues beyond K (D > N) are zero: each adds log α to log det(αI + βFᵀF).
    log_det = jnp.sum(jnp.log(alpha + beta * eig_K)) + (dim - eig_K.shape[0]) * jnp.log(alpha)
    evidence = (
        dim / 2 * jnp.log(alpha)
        + num_samples / 2 * jnp.log(beta)
        - log_det / 2
        - beta / 2 * res2
        - alpha / 2 * m2
        - num_samples / 2 * math.log(2 * math.pi)
    ) / num_samples
    return alpha, beta, t, evidence


def _solve(eig_K, proj2_KC, res_out_C, num_samples, dim, eps, tol, max_iter):
    """Runs the fixed point for all C columns at once; returns alpha, beta, t, evidence, each [C]."""
    per_column = functools.partial(
        _fixed_point, num_samples=num_samples, dim=dim, eps=eps, tol=tol, max_iter=max_iter
    )
    return jax.vmap(per_column, in_axes=(None, 1, 0))(eig_K, proj2_KC, res_out_C)


def _spectrum_cutoff(eig_K, num_samples, dim):
    """Eigenvalues at or below this count as zero.

    The reference drops singular values ≤ 1e-10 in float64. Eigenvalues of a rank-deficient Gram
    matrix come out of `eigh` as noise of order eps·max(N, D)·λ_max (possibly negative), so the
    cutoff is relative, the usual numerical-rank tolerance; in float64 it changes nothing the
    reference keeps that carries weight (those directions have λ ≪ α/β).
    """
    eps = jnp.finfo(eig_K.dtype).eps
    return jnp.max(eig_K) * jnp.maximum(num_samples, dim) * eps


def _result(alpha, beta, evidence, weights_CD):
    return LogMEResult(jnp.mean(evidence), evidence, alpha, beta, weights_CD)


def _from_gram(gram_DD, fty_DC, yy_C, num_samples, eps, tol, max_iter):
    """LogME from FᵀF, FᵀY and ‖y_c‖²: the N ≥ D path, and the streamed one."""
    dim = gram_DD.shape[0]
    eig_D, vecs_DD = jnp.linalg.eigh(gram_DD)
    kept_D = eig_D > _spectrum_cutoff(eig_D, num_samples, dim)
    eig_D = jnp.where(kept_D, eig_D, 0)
    # p = Vᵀ Fᵀ y = σ · (uᵀ y), so (uᵀ y)² = p² / λ on the kept directions.
    proj_DC = jnp.where(kept_D[:, None], jnp.matmul(vecs_DD.T, fty_DC, precision=_HIGHEST), 0)
    proj2_DC = proj_DC**2 / jnp.where(kept_D, eig_D, 1)[:, None]
    # ‖y‖² outside span(F): what the kept directions do not explain; ≥ 0 up to rounding.
    res_out_C = jnp.maximum(yy_C - jnp.sum(proj2_DC, axis=0), 0)
    alpha, beta, t, evidence = _solve(
        eig_D, proj2_DC, res_out_C, num_samples, dim, eps, tol, max_iter
    )
    # m = (FᵀF + t I)⁻¹ Fᵀ y = V diag(1 / (λ + t)) p.
    weights_DC = jnp.matmul(vecs_DD, proj_DC / (eig_D[:, None] + t), precision=_HIGHEST)
    return _result(alpha, beta, evidence, weights_DC.T)


def _from_kernel(feats_ND, targets, num_classes, eps, tol, max_iter):
    """LogME through FFᵀ [N, N]: the N < D path. Its eigenvectors span all of R^N, so the
    residual outside span(F) is a sum of squares, not a difference of large numbers."""
    num_samples, dim = feats_ND.shape
    kernel_NN = jnp.matmul(feats_ND, feats_ND.T, precision=_HIGHEST)
    eig_N, vecs_NN = jnp.linalg.eigh(kernel_NN)
    kept_N = eig_N > _spectrum_cutoff(eig_N, num_samples, dim)
    eig_N = jnp.where(kept_N, eig_N, 0)
    if num_classes is None:
        proj_NC = jnp.matmul(vecs_NN.T, targets, precision=_HIGHEST)
    else:  # Uᵀ onehot(y): sum the rows of U belonging to each class.
        proj_NC = jax.ops.segment_sum(vecs_NN, targets, num_segments=num_classes).T
    proj2_NC = jnp.where(kept_N[:, None], proj_NC**2, 0)
    res_out_C = jnp.sum(jnp.where(kept_N[:, None], 0, proj_NC**2), axis=0)
    alpha, beta, t, evidence = _solve(
        eig_N, proj2_NC, res_out_C, num_samples, dim, eps, tol, max_iter
    )
    # m = V diag(σ / (λ + t)) Uᵀy with V = Fᵀ U diag(1/σ), so m = Fᵀ U diag(1 / (λ + t)) Uᵀy.
    coef_NC = jnp.where(kept_N[:, None], proj_NC / (eig_N[:, None] + t), 0)
    weights_DC = jnp.matmul(
        feats_ND.T, jnp.matmul(vecs_NN, coef_NC, precision=_HIGHEST), precision=_HIGHEST
    )
    return _result(alpha, beta, evidence, weights_DC.T)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _logme(feats_ND, targets, num_classes, eps, tol, max_iter):
    """`targets`: [N] class indices when `num_classes` is set, else [N, C] real targets."""
    num_samples, dim = feats_ND.shape
    if num_samples < dim:
        return _from_kernel(feats_ND, targets, num_classes, eps, tol, max_iter)
    gram_DD = jnp.matmul(feats_ND.T, feats_ND, precision=_HIGHEST)
    if num_classes is None:
        fty_DC = jnp.matmul(feats_ND.T, targets, precision=_HIGHEST)
        yy_C = jnp.sum(targets**2, axis=0)
    else:  # Fᵀ onehot(y) is a per-class sum of rows: O(ND) instead of a [D, N] x [N, C] product.
        fty_DC = jax.ops.segment_sum(feats_ND, targets, num_segments=num_classes).T
        yy_C = jnp.zeros(num_classes, feats_ND.dtype).at[targets].add(1)
    return _from_gram(gram_DD, fty_DC, yy_C, num_samples, eps, tol, max_iter)


def _check_solver_args(eps, tol, max_iter):
    for name, value in (("eps", eps), ("tol", tol)):
        if not inputs.is_traced(value) and not (float(value) >= 0 and math.isfinite(float(value))):
            raise ValueError(f"{name} must be a finite number ≥ 0; got {value!r}")
    if not inputs.is_traced(max_iter) and (
        isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1
    ):
        raise ValueError(f"max_iter must be an integer ≥ 1; got {max_iter!r}")


def logme(
    features,
    targets,
    *,
    regression: bool = False,
    num_classes: int | None = None,
    eps: float = 1e-5,
    tol: float = 1e-3,
    max_iter: int = 11,
) -> LogMEResult:
    """LogME score of features for a target task.

    Computes in the dtype of `features`: float32 by default (as on TPU), float64 when x64 is
    enabled and float64 features are passed. Works under `jax.jit` (with `regression` and
    `num_classes` static); there, values cannot be checked, only shapes.

    Args:
        features: [N, D] real features of N samples, finite, N ≥ 2.
        targets: classification (default): [N] integer labels; the classes are the sorted
          distinct labels present (they need not be contiguous). With `regression=True`: [N] or
          [N, C] real targets, also the way to score multi-label 0/1 targets.
        regression: treat `targets` as real-valued columns instead of class labels.
        num_classes: classification only: use classes 0..num_classes-1 (labels must lie there;
          a class with no sample becomes an all-zero column). Required inside `jax.jit`.
        eps: added to the denominators of the α and β updates, as in the reference (1e-5).
        tol: a column stops when |t_new − t| / t ≤ tol, t = α/β.
        max_iter: a column stops after this many fixed-point steps at the latest.

    Returns:
        `LogMEResult` with score [], evidence, alpha, beta [C] and weights [C, D].

    Raises:
        TypeError: non-array input, or non-integer labels without `regression=True`.
        ValueError: NaN/inf in features or targets, N < 2, D == 0, fewer than 2 classes, targets
          whose length differs from N, or bad solver arguments.

    References:
        You et al., ICML 2021 (LogME) and JMLR 2022 (the fixed-point algorithm, Alg. 2).
    """
    feats_ND = inputs.check_features(features)
    num_samples = feats_ND.shape[0]
    _check_solver_args(eps, tol, max_iter)
    if regression:
        if num_classes is not None:
            raise ValueError(
                "num_classes is for classification; leave it None with regression=True"
            )
        targets_NC = inputs.check_targets(targets, num_samples, feats_ND.dtype)
        return _logme(feats_ND, targets_NC, None, eps, tol, max_iter)
    labels = inputs.check_labels(targets, num_samples, num_classes=num_classes, name="targets")
    return _logme(feats_ND, labels.index, labels.num_classes, eps, tol, max_iter)


def logme_from_gram(
    gram_DD,
    fty_DC,
    yy_C,
    num_samples,
    *,
    eps: float = 1e-5,
    tol: float = 1e-3,
    max_iter: int = 11,
) -> LogMEResult:
    """LogME from sufficient statistics, for features streamed in batches and never held whole.

    Equals `logme(F, Y, regression=True)` (or the classification form with Y = onehot(labels)).
    Rounding is best when N ≥ D; for N < D prefer `logme` on the features, whose kernel path
    avoids subtracting large numbers.

    Args:
        gram_DD: [D, D] FᵀF.
        fty_DC: [D, C] FᵀY (for classification, the per-class sums of feature rows).
        yy_C: [C] ‖y_c‖² of each target column (for classification, the class counts).
        num_samples: N, the number of rows summed (a scalar; may be a device array).
        eps, tol, max_iter: see `logme`.

    Returns:
        `LogMEResult`, computed in the dtype of `gram_DD`.

    Raises:
        ValueError: inconsistent shapes, non-finite statistics, or N < 2.
    """
    gram_DD = inputs.check_features(gram_DD, name="gram_DD")
    dim = gram_DD.shape[0]
    if gram_DD.shape != (dim, dim):
        raise ValueError(f"gram_DD must be square [D, D]; got shape {tuple(gram_DD.shape)}")
    fty_DC = inputs.check_features(jnp.atleast_2d(jnp.asarray(fty_DC).T).T, name="fty_DC")
    if fty_DC.shape[0] != dim:
        raise ValueError(
            f"fty_DC must have D={dim} rows to match gram_DD; got shape {tuple(fty_DC.shape)}"
        )
    yy_C = jnp.asarray(yy_C, gram_DD.dtype).reshape(-1)
    if yy_C.shape[0] != fty_DC.shape[1]:
        raise ValueError(
            f"yy_C must have C={fty_DC.shape[1]} entries to match fty_DC; got {yy_C.shape[0]}"
        )
    if not inputs.is_traced(num_samples) and not float(num_samples) >= 2:
        raise ValueError(f"num_samples must be ≥ 2; got {num_samples!r}")
    _check_solver_args(eps, tol, max_iter)
    stats = (gram_DD, fty_DC.astype(gram_DD.dtype), yy_C, jnp.asarray(num_samples, gram_DD.dtype))
    return _from_gram_jit(*stats, eps, tol, max_iter)


_from_gram_jit = jax.jit(_from_gram)


def logme_predict(result: LogMEResult, features) -> jax.Array:
    """Predictions of the LogME posterior-mean linear model.

    Args:
        result: a `LogMEResult` (weights [C, D]).
        features: [N, D] features.

    Returns:
        [N, C] f · mᵀ: regression outputs, or class scores (argmax gives the class index).
    """
    feats_ND = inputs.check_features(features, min_samples=1)
    if feats_ND.shape[1] != result.weights.shape[1]:
        raise ValueError(
            f"features have D={feats_ND.shape[1]} dimensions but the result was fit on D={result.weights.shape[1]}"
        )
    return jnp.matmul(feats_ND, result.weights.T.astype(feats_ND.dtype), precision=_HIGHEST)
