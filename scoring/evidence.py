"""MacKay's fixed point on a spectrum: the maximum evidence of each target column (LogME's core).

Given the spectrum of features F [N, D] and the coordinates of the target columns Y [N, C] on
it (`scoring.spectrum.Spectrum`), the evidence p(y | F, α, β) of y ~ N(F w, 1/β), w ~ N(0, 1/α)
is maximised over α, β by MacKay's fixed point (the one of You et al., JMLR 2022), a few O(K)
steps per column, in logarithms, batched over the columns with `vmap`. `scoring.logme` computes
the spectrum in each of its forms and calls `from_spectrum`.

Dimension names: N samples, D feature dimensions, C target columns, K = length of the spectrum.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from scoring.spectrum import HIGHEST, Spectrum

# The fixed point stops when t = α/β changes by at most TOL (relative), after MAX_ITER steps at
# the latest. The reference stops at 1e-3 after at most 11 steps, which is far from the maximum
# when a feature's small directions carry class signal: with σ spanning 1e-5 of σ_max, 2.6e-2
# relative off the exact evidence in float64; at 1e-6 / 100 steps it is 1e-14 there, and the
# steps are O(K) each (tests/test_logme.py::test_exact_when_small_directions_carry_signal).
TOL = 1e-6
MAX_ITER = 100
# The reference's own stopping rule: `logme(..., **REFERENCE_STOP)` reproduces its outputs.
REFERENCE_STOP = {"tol": 1e-3, "max_iter": 11}


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


def _fixed_point(eig_K, proj_K, res_out, log_scale2, num_samples, eps, tol, max_iter):
    """MacKay's fixed point for one target column, in logarithms.

    The reference iterates α ← γ / (‖m‖² + eps), β ← (N − γ) / (‖Fm − y‖² + eps) from α = β = 1.
    Here the spectrum is that of F' = F / c (λ' = λ / c², c a power of two) and the iteration
    runs on log α' = log(α / c²) and log β, which is the same sequence of α, β (eps in α's update
    becomes c²·eps) without overflow or underflow at any feature scale. Every sum is a log-sum-exp
    of terms without cancellation: with x_k = log(λ_k / t), t = α / β, the weights λ/(λ + t) and
    t/(λ + t) are exp(−softplus(∓x_k)), N − γ = (N − K) + Σ_k t/(λ_k + t), and
    log det(αI + βFᵀF) − D log α = Σ_k softplus(x_k).

    Args:
        eig_K: [K] λ'_k (0 for directions that carry nothing).
        proj_K: [K] coordinates u_kᵀ y on the left singular vectors.
        res_out: [] ‖y‖² outside those directions.
        log_scale2: [] log c².
        num_samples: N.
        eps, tol, max_iter: see `scoring.logme.logme`.

    Returns:
        (log_alpha, log_beta, log_t, evidence): α in the original units, β, t' = t / c² of the
        last step's input (the value the posterior mean is taken at, as in the reference), and
        log p(y | F, α, β) / N.
    """
    dtype = eig_K.dtype
    kept_K = eig_K > 0
    log_eig_K = jnp.log(jnp.where(kept_K, eig_K, 1))
    log_p2_K = 2 * jnp.log(jnp.abs(proj_K))  # −inf where y has no coordinate
    log_res_out = jnp.log(res_out)
    # The N − (number kept) directions with λ = 0, inside the spectrum or beyond it (N > D),
    # each add 1 to N − γ. (Counting them by K instead fails when a spectrum of K > N holds
    # zeros: a streamed R factor of N < D rows.)
    log_extra = jnp.log(num_samples - jnp.sum(kept_K).astype(dtype))
    log_eps = jnp.log(jnp.asarray(eps, dtype))
    log_eps_alpha = log_eps + log_scale2  # eps in α's update, in the scaled units

    # The four sums of a step are one log-sum-exp over the rows of a [4, K + 1] array (column K
    # holds what lies outside the K directions): one reduction instead of four, the same values,
    # and 0.86× the compile time of `_logme` (each reduction compiles as a kernel of its own).
    nothing_K = jnp.full_like(eig_K, -jnp.inf)
    nothing = jnp.full((), -jnp.inf, dtype)

    def sums(log_t):
        """log γ, log(N − γ), log ‖m'‖², log ‖F m − y‖² at t' = exp(log_t)."""
        x_K = jnp.where(kept_K, log_eig_K - log_t, -jnp.inf)  # log(λ / t)
        log_fit_K = -jax.nn.softplus(-x_K)  # log λ/(λ + t)
        log_shrink_K = -jax.nn.softplus(x_K)  # log t/(λ + t); 0 where λ = 0
        terms_4K = jnp.stack(
            [
                log_fit_K,
                # λ = 0 directions are counted once, outside (log_extra)
                jnp.where(kept_K, log_shrink_K, nothing_K),
                # ‖m'‖² = Σ λ p² / (λ + t)²
                jnp.where(
                    kept_K, log_p2_K + log_eig_K - 2 * jnp.logaddexp(log_t, log_eig_K), nothing_K
                ),
                log_p2_K + 2 * log_shrink_K,
            ]
        )
        outside_4 = jnp.stack([nothing, log_extra, nothing, log_res_out])
        terms_4L = jnp.concatenate([terms_4K, outside_4[:, None]], axis=1)
        log_gamma, log_rest, log_m2, log_res2 = jax.nn.logsumexp(terms_4L, axis=1)
        return log_gamma, log_rest, log_m2, log_res2

    def step(state):
        i, log_alpha, log_beta, *_ = state
        log_t = log_alpha - log_beta
        log_gamma, log_rest, log_m2, log_res2 = sums(log_t)
        log_alpha_new = log_gamma - jnp.logaddexp(log_m2, log_eps_alpha)
        log_beta_new = log_rest - jnp.logaddexp(log_res2, log_eps)
        change = jnp.abs(jnp.expm1((log_alpha_new - log_beta_new) - log_t))  # |t_new − t| / t
        return i + 1, log_alpha_new, log_beta_new, log_t, log_m2, log_res2, change <= tol

    def not_done(state):
        i, *_, done = state
        return (i < max_iter) & ~done

    zero = jnp.zeros((), dtype)
    init = (jnp.zeros((), jnp.int32), -log_scale2, zero, zero, zero, zero, jnp.zeros((), bool))
    _, log_alpha, log_beta, log_t, log_m2, log_res2, _ = jax.lax.while_loop(not_done, step, init)
    x_K = jnp.where(kept_K, log_eig_K - (log_alpha - log_beta), -jnp.inf)
    # D/2 log α + N/2 log β − ½ log det(αI + βFᵀF) − β/2 ‖Fm − y‖² − α/2 ‖m‖² − N/2 log 2π.
    evidence = (
        -jnp.sum(jax.nn.softplus(x_K)) / 2
        + num_samples / 2 * log_beta
        - jnp.exp(log_beta + log_res2) / 2
        - jnp.exp(log_alpha + log_m2) / 2
        - num_samples / 2 * math.log(2 * math.pi)
    ) / num_samples
    return log_alpha + log_scale2, log_beta, log_t, evidence


def from_spectrum(spectrum: Spectrum, num_samples, eps, tol, max_iter) -> LogMEResult:
    """Runs the fixed point for all C columns at once (`vmap`) and assembles the result.

    The scalars are cast first (N, eps and tol to the spectrum's dtype, max_iter to int32), so
    that a Python int, a float64 array or a weak-typed float compiles one program, not one each.
    The values are the same: the program cast them to these types where it used them.
    """
    dtype = spectrum.eig_K.dtype
    return _solve_spectrum(
        spectrum,
        jnp.asarray(num_samples, dtype),
        jnp.asarray(eps, dtype),
        jnp.asarray(tol, dtype),
        jnp.asarray(max_iter, jnp.int32),
    )


# The spectrum and the fixed point are compiled apart: the fixed point's program depends on the
# spectrum's shapes (D, K, C) and dtype only, so both methods, every N ≥ D and the streamed forms
# (`logme_from_gram`, `logme_from_factor`) of one task share it, and it is over half of the
# compile time of `logme` on a new shape. The price: a shape whose fixed point is new compiles two
# programs, about 1.05× the time of one (docs/benchmarks.md, "The test suite"). Under a caller's
# `jax.jit` both are inlined.
@jax.jit
def _solve_spectrum(spectrum: Spectrum, num_samples, eps, tol, max_iter) -> LogMEResult:
    """`from_spectrum`'s program: N, eps and tol in the spectrum's dtype, max_iter int32."""
    eig_K, lift_DK, proj_KC, res_out_C, scale_exp = spectrum
    dtype = eig_K.dtype
    log_scale2 = (2 * math.log(2)) * scale_exp.astype(dtype)
    per_column = functools.partial(
        _fixed_point,
        log_scale2=log_scale2,
        num_samples=num_samples,
        eps=eps,
        tol=tol,
        max_iter=max_iter,
    )
    log_alpha, log_beta, log_t, evidence = jax.vmap(per_column, in_axes=(None, 1, 0))(
        eig_K, proj_KC, res_out_C
    )
    # m' = V diag(σ / (λ + t)) Uᵀy in the scaled units; m = m' / c.
    denom_KC = eig_K[:, None] + jnp.exp(log_t)[None, :]
    coef_KC = jnp.where(denom_KC > 0, proj_KC / jnp.where(denom_KC > 0, denom_KC, 1), 0)
    weights_DC = jnp.ldexp(jnp.matmul(lift_DK, coef_KC, precision=HIGHEST), -scale_exp)
    return LogMEResult(
        jnp.mean(evidence), evidence, jnp.exp(log_alpha), jnp.exp(log_beta), weights_DC.T
    )
