"""Singular spectra of feature matrices for the linear-model scores (LogME, H-score).

LogME and the H-score need, for features F [N, D] and target columns Y [N, C], the squared singular
values λ_k = σ_k² of F, the coordinates u_kᵀY of the targets on F's left singular vectors, and
‖y‖² outside span(F). Two ways to get them:

* `gram_spectrum`: `eigh` of FᵀF [D, D] (N ≥ D) or of FFᵀ [N, N] (N < D). One matrix product and
  one symmetric eigendecomposition, the fastest route. But forming FᵀF squares F's condition
  number, and eigenvalues come out with an absolute error of about eps·λ_max: a direction whose
  λ lies below ~max(N, D)·eps·λ_max is noise and has to be dropped. In float64 that is
  λ < ~1e-13·λ_max, harmless for real features; in float32 it is λ < ~1e-4·λ_max, and deep
  features, whose Gram condition numbers reach 1e6–1e8, carry class information there.
* `factor_spectrum`: Householder QR of the augmented [F | Y] and the singular values and vectors
  of the D×D block R₁₁ (N ≥ D; Golub & Van Loan, "Matrix Computations", 4th ed., §5.3 and §8.6;
  for float32 R an `eigh` of R₁₁R₁₁ᵀ in float64 where the backend has it), or an SVD of F itself
  (N < D). Singular values carry an absolute error of about eps·σ_max, so λ = σ² is resolved
  down to ~eps²·λ_max: in float32 Gram condition numbers up to ~1e10 keep three or more digits.
  With R = [[R₁₁, R₁₂], [0, R₂₂]], F = Q₁R₁₁ and Y = Q₁R₁₂ + Q₂R₂₂, so for R₁₁ = UΣVᵀ the
  coordinates of Y on F's left singular vectors Q₁U are UᵀR₁₂, and ‖y_c‖² outside span(F) is
  ‖R₂₂[:, c]‖², a sum of squares rather than the difference ‖y‖² − Σ_k (u_kᵀy)² of large numbers.
  Q is never formed. The same block structure turns a running QR of streamed rows into the
  spectrum (`factor_spectrum_from_r`).

Both work on features scaled by an exact power of two (`power_of_two_scale`), so that neither
features of 1e-15 nor of 1e20 overflow or underflow; λ is returned in those scaled units and the
callers carry the scale.

Dimension names: N samples, D feature dimensions, C target columns, K = length of the spectrum
(min(N, D)).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from scoring.class_moments import HIGHEST


class Spectrum(NamedTuple):
    """The spectrum of scaled features F' = F · 2^−scale_exp and target coordinates on it.

    Attributes:
        eig_K: [K] λ_k = σ_k² of F' (0 for a dropped direction).
        lift_DK: [D, K] columns σ_k v_k (0 for a dropped direction): F'ᵀ u_k. A ridge solution
          is lift_DK @ (proj_KC / (eig_K + t)).
        proj_KC: [K, C] u_kᵀ y_c, the coordinates of each target column (0 for dropped k).
        res_out_C: [C] ‖y_c‖² outside the kept directions of span(F).
        scale_exp: [] int32 e with F = F' · 2^e.
    """

    eig_K: jax.Array
    lift_DK: jax.Array
    proj_KC: jax.Array
    res_out_C: jax.Array
    scale_exp: jax.Array


def power_of_two_exponent(x: jax.Array) -> jax.Array:
    """[] int32 e with max |x · 2^−e| in [0.5, 1); 0 for all-zero input."""
    _, exponent = jnp.frexp(jnp.max(jnp.abs(x)))
    return exponent.astype(jnp.int32)


def scale_by_power_of_two(x: jax.Array, exponent: jax.Array) -> jax.Array:
    """x · 2^−exponent, exact wherever the result is a normal number.

    Two multiplications by powers of two instead of `ldexp(x, −e)`: the same values with one
    fused multiply pass, 2.5× faster on CPU (ldexp takes its exponent apart per element), and
    each factor 2^−e/2 stays a normal number for any finite x.
    """
    half = exponent // 2
    one = jnp.ones((), x.dtype)
    return x * jnp.ldexp(one, -half) * jnp.ldexp(one, half - exponent)


def power_of_two_scale(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x · 2^−e, e) with max |x · 2^−e| in [0.5, 1): an exact rescaling (no rounding).

    All-zero input gives e = 0.
    """
    exponent = power_of_two_exponent(x)
    return scale_by_power_of_two(x, exponent), exponent


def _targets_matrix(targets, num_classes, dtype):
    """[N, C] targets: one-hot of class indices when `num_classes` is set, else as given."""
    if num_classes is None:
        return targets
    return (targets[:, None] == jnp.arange(num_classes)[None, :]).astype(dtype)


def _project(vecs_NK, targets, num_classes):
    """[K, C] Uᵀ Y: for class indices, the per-class sums of U's rows (O(NK), no one-hot)."""
    if num_classes is None:
        return jnp.matmul(vecs_NK.T, targets, precision=HIGHEST)
    return jax.ops.segment_sum(vecs_NK, targets, num_segments=num_classes).T


def gram_cutoff(eig_K, num_samples, dim):
    """Eigenvalues of FᵀF or FFᵀ at or below this are rounding noise: `eigh` resolves them to
    about max(N, D)·eps·λ_max (the usual numerical-rank tolerance); they may come out negative."""
    eps = jnp.finfo(eig_K.dtype).eps
    return jnp.max(eig_K) * jnp.maximum(num_samples, dim) * eps


def gram_spectrum(feats_ND, targets, num_classes=None) -> Spectrum:
    """The spectrum from `eigh` of FᵀF (N ≥ D) or FFᵀ (N < D), directions below `gram_cutoff`
    dropped.

    Args:
        feats_ND: [N, D] features.
        targets: [N] class indices in [0, num_classes) when `num_classes` is set, else [N, C].
        num_classes: C for class-index targets (static), or None.

    Returns:
        `Spectrum` with K = D (N ≥ D) or K = N (N < D).
    """
    num_samples, dim = feats_ND.shape
    scale_exp = power_of_two_exponent(feats_ND)
    if num_samples < dim:
        scaled_ND = scale_by_power_of_two(feats_ND, scale_exp)
        kernel_NN = jnp.matmul(scaled_ND, scaled_ND.T, precision=HIGHEST)
        eig_N, vecs_NN = jnp.linalg.eigh(kernel_NN)
        kept_N = eig_N > gram_cutoff(eig_N, num_samples, dim)
        proj_NC = _project(vecs_NN, targets, num_classes)
        # U spans all of R^N: what the kept directions miss is a sum of squares.
        res_out_C = jnp.sum(jnp.where(kept_N[:, None], 0, proj_NC**2), axis=0)
        lift_DN = jnp.matmul(scaled_ND.T, jnp.where(kept_N[None, :], vecs_NN, 0), precision=HIGHEST)
        return Spectrum(
            jnp.where(kept_N, eig_N, 0),
            lift_DN,
            jnp.where(kept_N[:, None], proj_NC, 0),
            res_out_C,
            scale_exp,
        )
    gram_DD, fty_DC = jax.lax.cond(
        jnp.abs(scale_exp) <= _unscaled_sums_exponent(feats_ND.dtype),
        # FᵀF · 2^−2e and FᵀY · 2^−e are the sums of F · 2^−e, bit for bit (products and sums
        # of powers of two scale exactly), without writing the scaled copy of F: in float64 at
        # (20000, 2048) that copy cost as much as 10 % of the Gram matrix and its `eigh`.
        lambda: _scale_sums(*_gram_sums(feats_ND, targets, num_classes), scale_exp),
        lambda: _gram_sums(scale_by_power_of_two(feats_ND, scale_exp), targets, num_classes),
    )
    if num_classes is None:
        yy_C = jnp.sum(targets**2, axis=0)
    else:
        yy_C = jnp.zeros(num_classes, feats_ND.dtype).at[targets].add(1)
    return _spectrum_from_gram(gram_DD, fty_DC, yy_C, num_samples, scale_exp)


def _unscaled_sums_exponent(dtype) -> int:
    """Features with max |F| within 2^±this form FᵀF without overflow (N ≤ 2^(maxexp/2)) or
    products falling below the normal range before any rounding that scaling would avoid."""
    return jnp.finfo(dtype).maxexp // 8


def _gram_sums(feats_ND, targets, num_classes):
    """(FᵀF [D, D], FᵀY [D, C]); class-index targets by a per-class sum of rows (O(ND))."""
    gram_DD = jnp.matmul(feats_ND.T, feats_ND, precision=HIGHEST)
    if num_classes is None:
        return gram_DD, jnp.matmul(feats_ND.T, targets, precision=HIGHEST)
    return gram_DD, jax.ops.segment_sum(feats_ND, targets, num_segments=num_classes).T


def _scale_sums(gram_DD, fty_DC, scale_exp):
    """The sums of F · 2^−e from those of F: FᵀF · 2^−2e and FᵀY · 2^−e."""
    return scale_by_power_of_two(gram_DD, 2 * scale_exp), scale_by_power_of_two(fty_DC, scale_exp)


def gram_spectrum_from_sums(gram_DD, fty_DC, yy_C, num_samples) -> Spectrum:
    """The spectrum from FᵀF [D, D], FᵀY [D, C] and ‖y_c‖² [C] (streamed sums), as `gram_spectrum`.

    `num_samples` is N (a number or a scalar array); it sets the noise cutoff.
    """
    _, exponent = jnp.frexp(jnp.max(jnp.abs(gram_DD)))
    # Scale FᵀF by 2^−2e and FᵀY by 2^−e: the sums of F · 2^−e (exact for an even power).
    scale_exp = (exponent // 2).astype(jnp.int32)
    gram_DD, fty_DC = _scale_sums(gram_DD, fty_DC, scale_exp)
    return _spectrum_from_gram(gram_DD, fty_DC, yy_C, num_samples, scale_exp)


def _spectrum_from_gram(gram_DD, fty_DC, yy_C, num_samples, scale_exp) -> Spectrum:
    dim = gram_DD.shape[0]
    eig_D, vecs_DD = jnp.linalg.eigh(gram_DD)
    kept_D = eig_D > gram_cutoff(eig_D, num_samples, dim)
    eig_D = jnp.where(kept_D, eig_D, 0)
    sigma_D = jnp.sqrt(eig_D)
    # Vᵀ Fᵀ y = σ · (uᵀ y), so uᵀ y = (Vᵀ Fᵀ y) / σ on the kept directions.
    scaled_proj_DC = jnp.matmul(vecs_DD.T, fty_DC, precision=HIGHEST)
    proj_DC = jnp.where(kept_D[:, None], scaled_proj_DC / jnp.where(kept_D, sigma_D, 1)[:, None], 0)
    # ‖y‖² outside span(F): what the kept directions do not explain; ≥ 0 up to rounding.
    res_out_C = jnp.maximum(yy_C - jnp.sum(proj_DC**2, axis=0), 0)
    return Spectrum(eig_D, vecs_DD * sigma_D[None, :], proj_DC, res_out_C, scale_exp)


def factor_spectrum(feats_ND, targets, num_classes=None) -> Spectrum:
    """The spectrum from singular values of F: QR of [F | Y] and the D×D step on R₁₁ (N ≥ D,
    `factor_spectrum_from_r`), or SVD of F (N < D). Nothing is dropped: the directions come with σ ≥ 0 and callers that need a rank
    apply their own cutoff.

    Args:
        feats_ND: [N, D] features.
        targets: [N] class indices in [0, num_classes) when `num_classes` is set, else [N, C].
        num_classes: C for class-index targets (static), or None.

    Returns:
        `Spectrum` with K = min(N, D).
    """
    num_samples, dim = feats_ND.shape
    scaled_ND, scale_exp = power_of_two_scale(feats_ND)
    if num_samples < dim:
        vecs_NN, sigma_N, vt_ND = jnp.linalg.svd(scaled_ND, full_matrices=False)
        proj_NC = _project(vecs_NN, targets, num_classes)
        num_columns = proj_NC.shape[1]
        return Spectrum(
            sigma_N**2,
            vt_ND.T * sigma_N[None, :],
            proj_NC,
            jnp.zeros(num_columns, feats_ND.dtype),  # U spans R^N
            scale_exp,
        )
    targets_NC = _targets_matrix(targets, num_classes, feats_ND.dtype)
    r_factor = jnp.linalg.qr(jnp.concatenate([scaled_ND, targets_NC], axis=1), mode="r")
    spectrum = factor_spectrum_from_r(r_factor, dim)
    return spectrum._replace(scale_exp=scale_exp)


def float64_step_available() -> bool:
    """Whether the D×D step of a float32 factor runs in float64: every backend but TPU has it
    (checked at trace time, so a jitted caller compiles the backend's own choice)."""
    return jax.default_backend() != "tpu"


def factor_spectrum_from_r(r_factor, dim) -> Spectrum:
    """The spectrum from the R factor of [F | Y].

    The D×D step (σ and the singular vectors of R₁₁) runs in float64 wherever the backend has it
    (`float64_step_available`: CPU, GPU), whatever the dtype of R: for float32 R it is
    `eigh(R₁₁R₁₁ᵀ)` in float64, whose λ carry an absolute error of ~1e-16·λ_max, so σ is resolved
    to ~1e-8·σ_max, below the ~6e-8·σ_max to which float32 R holds it; an SVD of R₁₁ in float32
    resolves σ only to ~1e-7·σ_max and moved LogME by 3e-3 where σ spans 1e-6 with signal in
    every direction (1e-6 with this step; tests/test_logme.py). On TPU it is a float32 SVD.
    R₁₁R₁₁ᵀ = UΣ²Uᵀ gives U directly, so UᵀR₁₂ and VΣ = R₁₁ᵀU need no division by a small σ.

    Args:
        r_factor: [M, D + C] upper-triangular (or trapezoidal) R of a QR factorisation of
          [F | Y]; rows not present are zero (M = min(N, D + C)).
        dim: D (static).

    Returns:
        `Spectrum` in the dtype of `r_factor`, λ in descending order, K = min(M, D) and
        scale_exp = 0 (the caller scales F's columns of R beforehand).
    """
    r11_DD = r_factor[:dim, :dim]
    r12_DC = r_factor[:dim, dim:]
    r22_MC = r_factor[dim:, dim:]
    res_out_C = jnp.sum(r22_MC**2, axis=0)
    if r_factor.dtype == jnp.float32 and float64_step_available():
        with jax.enable_x64(True):
            r11_DD = r11_DD.astype(jnp.float64)  # exact: products of float32 fit float64
            eig_D, vecs_DD = jnp.linalg.eigh(jnp.matmul(r11_DD, r11_DD.T, precision=HIGHEST))
            eig_D, vecs_DD = jnp.maximum(eig_D[::-1], 0), vecs_DD[:, ::-1]  # descending, as SVD
            lift_DD = jnp.matmul(r11_DD.T, vecs_DD, precision=HIGHEST)
            proj_DC = jnp.matmul(vecs_DD.T, r12_DC.astype(jnp.float64), precision=HIGHEST)
            spectrum = (eig_D, lift_DD, proj_DC)
            eig_D, lift_DD, proj_DC = (x.astype(jnp.float32) for x in spectrum)
        return Spectrum(eig_D, lift_DD, proj_DC, res_out_C, jnp.zeros((), jnp.int32))
    vecs_DD, sigma_D, vt_DD = jnp.linalg.svd(r11_DD, full_matrices=False)
    proj_DC = jnp.matmul(vecs_DD.T, r12_DC, precision=HIGHEST)
    return Spectrum(
        sigma_D**2,
        vt_DD.T * sigma_D[None, :],
        proj_DC,
        res_out_C,
        jnp.zeros((), jnp.int32),
    )


def right_singular_pairs(x_ND) -> tuple[jax.Array, jax.Array]:
    """(σ_K [K], V_DK [D, K]) of X = UΣVᵀ, K = min(N, D), without forming U: for N > D a QR
    first, then the SVD of its R [D, D]."""
    num_rows, dim = x_ND.shape
    if num_rows > dim:
        x_ND = jnp.linalg.qr(x_ND, mode="r")
    _, sigma_K, vt_KD = jnp.linalg.svd(x_ND, full_matrices=False)
    return sigma_K, vt_KD.T
