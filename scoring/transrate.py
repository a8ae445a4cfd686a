"""TransRate: the mutual information between features and labels, measured by coding rates.

Huang, Huang, Rong, Yang & Wei, "Frustratingly Easy Transferability Estimation", ICML 2022.

The coding rate R(Z, ε) = ½ log det(I + ZᵀZ / (n ε)) of n centred feature rows Z estimates the
number of bits needed to encode them up to distortion ε. TransRate is the rate of all features minus
the mean rate of the features of each class:

    TrR = R(Z, ε) − 1/C Σ_c R(Z_c, ε),

Z centred once with the global mean, Z_c its rows of class c (n_c of them), ε = 1e-4 — the
constants of the authors' released code (the paper writes the scaling as d/(n ε²); the code's
1/(n ε) is what its reported numbers use). Higher means the classes occupy more separate volumes.

Each log det is Σ_i log(1 + σ_i² / (n ε)) over the singular values σ_i of the block (Sylvester:
the same on the n or the D side), summed as softplus(2 log σ_i − log(n ε)). Singular values carry
rounding of ~eps·σ_max, where a Cholesky factor of I + ZᵀZ/(nε) carries ~eps of its largest
eigenvalue, so this keeps float32 accurate on anisotropic features, on N < D blocks at any scale
(the centred Z has a zero singular value, whose rounding a Cholesky of I + ZZᵀ/(nε) turns into
a large log), and at tiny scales, where log(1 + x) is taken without first rounding 1 + x and TrR,
a difference of nearly equal rates there, is summed from its linear and curvature parts
separately (`_transrate`). Singular
values below the block's numerical-rank tolerance max(n, D)·eps·σ_max count as zero. The
features are rescaled by an exact power of two first and the scale carried in logarithms, so no
magnitude from 1e-15 to 1e20 overflows. The per-class blocks are batched by gathering each
class's rows into a zero-padded [C, n_max, D] block; zero rows add zero singular values, which
change no log det.

Dimension names: N samples, D feature dimensions, C classes, n_max the largest class size.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from scoring import inputs
from scoring.spectrum import power_of_two_scale

DEFAULT_EPS = 1e-4


_SMALL = 0.1  # below this, log(1 + x) is taken as x + (log(1 + x) − x), the latter by series
_SERIES_TERMS = 20  # 0.1^21 / 21 < 1e-17 · 0.1² / 2: float64 accuracy at x = 0.1


def _log1p_minus_identity(x):
    """log(1 + x) − x for 0 ≤ x ≤ 0.1, as −x²/2 + x³/3 − … (Horner), without the cancellation of
    subtracting x from log1p(x)."""
    acc = jnp.zeros_like(x)
    for n in range(_SERIES_TERMS + 1, 1, -1):
        acc = x * ((-1) ** (n + 1) / n + acc)
    return x * acc


def _coding_rates(rows_BnD, log_scale, counts_B, eps):
    """Coding rates R = ½ Σ_i log(1 + x_i), x_i = σ_i² / (n ε), of a batch of row blocks
    Z = rows · e^log_scale.

    Returns:
        ([B] R, [B] ½ Σ_i (log(1 + x_i) − x_i) with x clipped at 0.1, [B] max_i log x_i).
    """
    n_max, dim = rows_BnD.shape[-2:]
    sigma_BK = jnp.linalg.svd(rows_BnD, compute_uv=False)
    tol = max(n_max, dim) * jnp.finfo(rows_BnD.dtype).eps
    kept_BK = sigma_BK > tol * jnp.max(sigma_BK, axis=-1, keepdims=True)
    log_sigma_BK = jnp.log(jnp.where(kept_BK, sigma_BK, 1)) + log_scale
    log_a_B = -jnp.log(counts_B) - math.log(eps)  # log 1/(n ε)
    log_x_BK = jnp.where(kept_BK, 2 * log_sigma_BK + log_a_B[:, None], -jnp.inf)
    rate_B = 0.5 * jnp.sum(jax.nn.softplus(log_x_BK), axis=-1)
    small_x_BK = jnp.exp(jnp.minimum(log_x_BK, math.log(_SMALL)))
    curvature_B = 0.5 * jnp.sum(_log1p_minus_identity(small_x_BK), axis=-1)
    return rate_B, curvature_B, jnp.max(log_x_BK, axis=-1)


@functools.partial(jax.jit, static_argnames=("eps",))
def _transrate(feats_ND, labels_N, members_Cn, eps):
    """TrR, computed two ways: directly, and for small scales (every x ≤ 0.1) as its part linear
    in the x_i, ½ Σ_i ‖z_i‖² (1/N − 1/(C n_{y_i})) / ε, which cancels exactly for balanced classes,
    plus the difference of the Σ (log(1 + x) − x) terms. Both are the same number; the second
    keeps its digits when TrR is far smaller than the rates it is a difference of."""
    num_samples = feats_ND.shape[0]
    dtype = feats_ND.dtype
    scaled_ND, scale_exp = power_of_two_scale(feats_ND)
    log_scale = scale_exp.astype(dtype) * math.log(2)
    centered_ND = scaled_ND - jnp.mean(scaled_ND, axis=0, keepdims=True)
    total = jnp.full((1,), num_samples, dtype)
    rate_all, curvature_all, log_x_max = _coding_rates(centered_ND[None], log_scale, total, eps)
    present_Cn = members_Cn >= 0
    class_rows_CnD = jnp.where(present_Cn[..., None], centered_ND[jnp.maximum(members_Cn, 0)], 0)
    counts_C = jnp.sum(present_Cn, axis=1).astype(dtype)
    rate_C, curvature_C, log_x_max_C = _coding_rates(class_rows_CnD, log_scale, counts_C, eps)
    direct = rate_all[0] - jnp.mean(rate_C)

    num_classes = counts_C.shape[0]
    weight_N = 1 / num_samples - 1 / (num_classes * counts_C[labels_N])
    weighted = jnp.sum(weight_N * jnp.sum(centered_ND**2, axis=1))
    log_prefactor = 2 * log_scale - math.log(2 * eps)
    linear = jnp.sign(weighted) * jnp.exp(jnp.log(jnp.abs(weighted)) + log_prefactor)
    series = linear + curvature_all[0] - jnp.mean(curvature_C)
    all_small = jnp.maximum(log_x_max[0], jnp.max(log_x_max_C)) <= math.log(_SMALL)
    return jnp.where(all_small, series, direct)


def class_members(labels_N: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, n_max] row indices of each class, padded with −1 (host-side)."""
    order = np.argsort(labels_N, kind="stable")
    counts = np.bincount(labels_N, minlength=num_classes)
    members = np.full((num_classes, max(int(counts.max()), 1)), -1, np.int32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for c in range(num_classes):
        members[c, : counts[c]] = order[starts[c] : starts[c] + counts[c]]
    return members


def transrate(features, labels, *, eps: float = DEFAULT_EPS) -> jax.Array:
    """TransRate TrR = R(Z, ε) − 1/C Σ_c R(Z_c, ε) (module docstring).

    Not traceable by `jax.jit` as a whole: the class grouping sets array shapes, so it is done on
    the host (the heavy part, the log determinants, runs jitted).

    Args:
        features: [N, D] real features, finite, N ≥ 2; computes in their dtype.
        labels: [N] integer labels, 0..C−1 (see `scoring.inputs.check_labels`; the reference
          averages over max(label) + 1 classes, counting absent ones as rate 0; here only classes
          that occur are averaged).
        eps: the distortion ε (default 1e-4, the authors').

    Returns:
        [] TransRate in nats (higher means more transferable).

    Raises:
        TypeError, ValueError: bad features or labels (see `scoring.inputs`), eps ≤ 0, or a call
          under `jax.jit`.

    References:
        Huang et al., "Frustratingly Easy Transferability Estimation", ICML 2022, Eq. (4)–(6).
    """
    feats_ND = inputs.check_features(features)
    if inputs.is_traced(feats_ND) or inputs.is_traced(labels):
        raise ValueError("transrate groups rows by class on the host; call it outside jax.jit")
    labels = inputs.check_labels(labels, feats_ND.shape[0])
    if not float(eps) > 0:
        raise ValueError(f"eps must be > 0; got {eps!r}")
    members_Cn = class_members(np.asarray(labels.index), labels.num_classes)
    return _transrate(feats_ND, labels.index, jnp.asarray(members_Cn), float(eps))
