"""TransRate: the mutual information between features and labels, measured by coding rates.

Huang, Huang, Rong, Yang & Wei, "Frustratingly Easy Transferability Estimation", ICML 2022.

The coding rate R(Z, ε) = ½ log det(I + ZᵀZ / (n ε)) of n centred feature rows Z estimates the
number of bits needed to encode them up to distortion ε. TransRate is the rate of all features minus
the mean rate of the features of each class:

    TrR = R(Z, ε) − 1/C Σ_c R(Z_c, ε),

Z centred once with the global mean, Z_c its rows of class c (n_c of them), ε = 1e-4 — the
constants of the authors' released code (the paper writes the scaling as d/(n ε²); the code's
1/(n ε) is what its reported numbers use). Higher means the classes occupy more separate volumes.

Each log det is taken on the smaller side, log det(I_D + a ZᵀZ) = log det(I_n + a ZZᵀ) (Sylvester),
by a Cholesky factorisation. The per-class matrices are batched by gathering each class's rows into
a zero-padded [C, n_max, D] block; zero rows add identity blocks, which change no determinant.

Dimension names: N samples, D feature dimensions, C classes, n_max the largest class size.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from scoring import inputs
from scoring.class_moments import HIGHEST

DEFAULT_EPS = 1e-4


def _logdet_identity_plus(scale, rows_BnD):
    """log det(I + scale · XᵀX) for a batch of [n, D] row blocks X, on the smaller side."""
    n, dim = rows_BnD.shape[-2:]
    if n <= dim:
        gram = jnp.einsum("bnd,bmd->bnm", rows_BnD, rows_BnD, precision=HIGHEST)
    else:
        gram = jnp.einsum("bnd,bne->bde", rows_BnD, rows_BnD, precision=HIGHEST)
    eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
    chol = jnp.linalg.cholesky(eye + scale[:, None, None] * gram)
    return 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


@functools.partial(jax.jit, static_argnames=("eps",))
def _transrate(feats_ND, members_Cn, eps):
    num_samples = feats_ND.shape[0]
    centered_ND = feats_ND - jnp.mean(feats_ND, axis=0)
    rate_all = (
        0.5
        * _logdet_identity_plus(
            jnp.full((1,), 1 / (num_samples * eps), feats_ND.dtype), centered_ND[None]
        )[0]
    )
    present_Cn = members_Cn >= 0
    class_rows_CnD = jnp.where(present_Cn[..., None], centered_ND[jnp.maximum(members_Cn, 0)], 0)
    counts_C = jnp.sum(present_Cn, axis=1).astype(feats_ND.dtype)
    rate_C = 0.5 * _logdet_identity_plus(1 / (counts_C * eps), class_rows_CnD)
    return rate_all - jnp.mean(rate_C)


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
        labels: [N] integer labels; the classes are the distinct values present (the reference
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
    return _transrate(feats_ND, jnp.asarray(members_Cn), float(eps))
