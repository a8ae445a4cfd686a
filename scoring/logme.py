"""LogME: the log maximum evidence of a Bayesian linear model on frozen features.

You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021;
You et al., "Ranking and Tuning Pre-trained Models: A New Paradigm for Exploiting Model Hubs",
JMLR 2022 (the fixed-point algorithm used here).

For each target column y the model is y ~ N(F w, 1/β), w ~ N(0, 1/α). LogME maximises the evidence
p(y | F, α, β) over α, β with MacKay's fixed point and reports log p / N; the score is the mean over
columns (one column per class for classification, one-hot coded). A higher score means the features
fit the task better with a linear head, which predicts fine-tuned accuracy.

All the work that depends on F is one spectral decomposition (`scoring.spectrum`): singular values
of F from a QR of [F | Y] and a decomposition of its D×D block, in float64 where the backend
has it (the "factor" method, the float32 default),
or an eigendecomposition of FᵀF [D, D] or FFᵀ [N, N] (the "gram" method, the float64 default);
`logme`'s docstring says what each gives. The target columns are projected onto the singular
vectors in one matrix product, and the per-column fixed point (a few O(K) steps each, in
logarithms) runs batched with `vmap` (`scoring.evidence`).

Dimension names: N samples, D feature dimensions, C target columns, K = length of the computed
spectrum (min(N, D)).
"""

import functools
import math

import jax
import jax.numpy as jnp

from scoring import evidence, inputs
from scoring.evidence import MAX_ITER, TOL, LogMEResult
from scoring.spectrum import (
    HIGHEST,
    Spectrum,
    factor_spectrum,
    factor_spectrum_from_r,
    gram_spectrum,
    gram_spectrum_from_sums,
    power_of_two_scale,
)

METHODS = ("factor", "gram")

# float64's default: the Gram route while `eigh` resolves every kept eigenvalue to ~1e-7 of
# itself (λ ≥ GRAM_RESOLVES·λ_max: eigenvalues carry an absolute error of ~eps·λ_max), else the
# factor route, which resolves σ to eps·σ_max (λ to eps²·λ_max).
GRAM_RESOLVES = 1e-9


def _logme(feats_ND, targets, num_classes, eps, tol, max_iter, method):
    """`targets`: [N] class indices when `num_classes` is set, else [N, C] real targets."""
    spectrum = _spectrum(feats_ND, targets, num_classes, method)
    return evidence.from_spectrum(spectrum, feats_ND.shape[0], eps, tol, max_iter)


@functools.partial(jax.jit, static_argnames=("num_classes", "method"))
def _spectrum(feats_ND, targets, num_classes, method) -> Spectrum:
    """The spectrum `method` computes for these features and targets."""
    if method == "factor":
        spectrum = factor_spectrum(feats_ND, targets, num_classes)
    else:
        spectrum = gram_spectrum(feats_ND, targets, num_classes)
    if method == "gram_else_factor":
        # Every direction kept and resolved: a dropped or barely resolved one may carry signal.
        resolved = jnp.min(spectrum.eig_K) >= GRAM_RESOLVES * jnp.max(spectrum.eig_K)
        # Only the branch taken runs: features the Gram route resolves pay no QR.
        spectrum = jax.lax.cond(
            resolved,
            lambda: spectrum,
            lambda: factor_spectrum(feats_ND, targets, num_classes),
        )
    return spectrum


def _check_solver_args(eps, tol, max_iter):
    for name, value in (("eps", eps), ("tol", tol)):
        if not inputs.is_traced(value) and not (float(value) >= 0 and math.isfinite(float(value))):
            raise ValueError(f"{name} must be a finite number ≥ 0; got {value!r}")
    if not inputs.is_traced(max_iter) and (
        isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1
    ):
        raise ValueError(f"max_iter must be an integer ≥ 1; got {max_iter!r}")


def _resolve_method(method, dtype) -> str:
    if method is None:
        return "gram_else_factor" if dtype == jnp.float64 else "factor"
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} or None; got {method!r}")
    return method


def _check_finite_result(result: LogMEResult, dtype) -> LogMEResult:
    """Eager calls only: a non-finite score is reported, never returned."""
    if inputs.is_traced(result.score) or bool(jnp.isfinite(result.score)):
        return result
    raise ValueError(
        f"LogME came out non-finite in {jnp.dtype(dtype).name} (evidence per column: "
        f"{[float(e) for e in result.evidence[:5]]}...): the targets' squared norms overflow "
        "this dtype, or eps=0 met a target column with no component in span(features); scale "
        "the targets down or keep eps > 0"
    )


def logme(
    features,
    targets,
    *,
    regression: bool = False,
    num_classes: int | None = None,
    eps: float = 1e-5,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
    method: str | None = None,
) -> LogMEResult:
    """LogME score of features for a target task.

    Computes in the dtype of `features`: float32 by default, float64 when x64 is enabled and
    float64 features are passed. Works under `jax.jit` (with `regression`, `num_classes` and
    `method` static); there, values cannot be checked, only shapes.

    Accuracy. Two spectral methods give the same numbers in exact arithmetic:

    * "factor" (default for float32, and for bfloat16/float16/integer input, which compute in
      float32): singular values of F from a Householder QR of [F | Y] and the D×D step on its
      block R₁₁ (N ≥ D), or an SVD of F (N < D). The D×D step runs in float64 wherever the
      backend has it (CPU, GPU: `eigh` of R₁₁R₁₁ᵀ, `scoring.spectrum.factor_spectrum_from_r`),
      and is a float32 SVD on TPU. σ is resolved to about eps·σ_max of float32, so the score is
      within ~1e-5 relative of float64 up to Gram condition numbers κ(FᵀF) ≈ 1e8 and within
      1e-3 well beyond (tested on decaying, flat and low-rank spectra at κ up to 1e8 and on
      `scripts/benchmarks/logme.py`'s tasks). Speed: a QR costs more than a Gram matrix (on CPU
      LAPACK's QR runs at about a third of XLA's matmul rate), and any method exact at the
      level of singular values needs one. At (N, D, C) = (20000, 2048, 200) on a 2-core CPU
      it takes 3.1× the time of one float32 FᵀF plus `eigh`, and float64 1.11× its own
      FᵀF plus `eigh` (quiet machine, `scripts/benchmarks/logme.py`; the figures and their
      commit in docs/benchmarks.md).
    * "gram": `eigh` of FᵀF (N ≥ D) or FFᵀ (N < D), the reference's own route and the fastest.
      λ is resolved to about max(N, D)·eps·λ_max and smaller eigenvalues are dropped as noise:
      exact to ~1e-12 in float64 for κ(FᵀF) up to ~1e8 (the fixtures of the reference
      implementation agree to 1e-8), but in float32 it drops every direction with
      λ < ~1e-4·λ_max, which on anisotropic deep features moves the score by tens of percent.
    * float64's default (method=None) is "gram" when every eigenvalue is ≥ `GRAM_RESOLVES`
      (1e-9) of the largest, else "factor" (one `lax.cond`: only the branch taken runs).
      Measured against the exact evidence (float64 SVD, every direction, fixed point converged)
      on features whose small directions carry class signal, σ spanning down to 1e-6 of σ_max:
      float64 within 1e-10; float32 within 2e-7 with the float64 D×D step, and with TPU's
      float32 one within 1e-6 down to 1e-4 and ~3e-3 at 1e-6
      (tests/test_logme.py::test_exact_when_small_directions_carry_signal,
      test_float32_step_where_the_backend_lacks_float64).

    Both run the fixed point on the features scaled by an exact power of two and in logarithms
    of α and β (`_fixed_point`), which is the same iteration as the reference's, so features of
    any magnitude from 1e-15 to 1e20 give a finite score in both dtypes. The maximised evidence
    is invariant to multiplying all features by a constant; the reference's iteration is not
    quite: its start α = β = 1 and the eps = 1e-5 added to ‖m‖² are in the features' units, and
    once ‖m‖² ≪ eps (features of magnitude ≳ 1e3) eps holds α below its optimum. This function
    reproduces the reference's iteration there too (pass eps=0 for the unguarded fixed point).

    N < D. The reference's default code (thuml/LogME `LogME.fit` via `_fit_fixed_point`) takes
    log det(αI + βFᵀF) over the k ≤ N nonzero eigenvalues only, forgetting the D − k zero ones,
    each of which contributes log α (its issue #23); its ICML-version path and this function
    count all D, so for N < D this score differs from that code's output, by design (the
    fixtures' `score` vs `score_reference_code`).

    Args:
        features: [N, D] real features of N samples, finite, N ≥ 2.
        targets: classification (default): [N] integer labels; with `num_classes` unset they
          should be 0..C−1 with every class present (other label sets are scored with one class
          per distinct value, after a warning that lists the class counts). With
          `regression=True`: [N] or [N, C] real targets, also the way to score multi-label 0/1
          targets.
        regression: treat `targets` as real-valued columns instead of class labels.
        num_classes: classification only: use classes 0..num_classes-1 (labels must lie there;
          a class with no sample becomes an all-zero column). Required inside `jax.jit`.
        eps: added to the denominators of the α and β updates, as in the reference (1e-5).
        tol: a column stops when |t_new − t| / t ≤ tol, t = α/β (default `TOL`, 1e-6; the
          reference's 1e-3 and 11 steps stop short of the maximum, see `TOL`).
        max_iter: a column stops after this many fixed-point steps at the latest (`MAX_ITER`).
        method: "factor", "gram", or None for the dtype's default (see Accuracy above).

    Returns:
        `LogMEResult` with score [], evidence, alpha, beta [C] and weights [C, D].

    Raises:
        TypeError: non-array input, or non-integer labels without `regression=True`.
        ValueError: NaN/inf in features or targets, N < 2, D == 0, fewer than 2 classes, targets
          whose length differs from N, bad solver arguments or method, or (eager calls) a score
          that came out non-finite.

    References:
        You et al., ICML 2021 (LogME) and JMLR 2022 (the fixed-point algorithm, Alg. 2).
    """
    feats_ND = inputs.check_features(features)
    num_samples = feats_ND.shape[0]
    _check_solver_args(eps, tol, max_iter)
    method = _resolve_method(method, feats_ND.dtype)
    if regression:
        if num_classes is not None:
            raise ValueError(
                "num_classes is for classification; leave it None with regression=True"
            )
        targets_NC = inputs.check_targets(targets, num_samples, feats_ND.dtype)
        result = _logme(feats_ND, targets_NC, None, eps, tol, max_iter, method)
    else:
        labels = inputs.check_labels(targets, num_samples, num_classes=num_classes, name="targets")
        result = _logme(feats_ND, labels.index, labels.num_classes, eps, tol, max_iter, method)
    return _check_finite_result(result, feats_ND.dtype)


def _check_num_samples(num_samples):
    if not inputs.is_traced(num_samples) and not float(num_samples) >= 2:
        raise ValueError(f"num_samples must be ≥ 2; got {num_samples!r}")


def logme_from_gram(
    gram_DD,
    fty_DC,
    yy_C,
    num_samples,
    *,
    eps: float = 1e-5,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
) -> LogMEResult:
    """LogME from the sums FᵀF, FᵀY, ‖y_c‖² and N, by the "gram" method of `logme`.

    Equals `logme(F, Y, regression=True, method="gram")` (or the classification form with
    Y = onehot(labels)). Sums of products lose what `logme`'s docstring describes for the
    "gram" method: use float64 sums, or in float32 stream an R factor instead
    (`scoring.stats`, `logme_from_factor`). For N < D prefer `logme` on the features.

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
    _check_num_samples(num_samples)
    _check_solver_args(eps, tol, max_iter)
    num_samples = jnp.asarray(num_samples, gram_DD.dtype)
    spectrum = _gram_sums_spectrum(gram_DD, fty_DC.astype(gram_DD.dtype), yy_C, num_samples)
    result = evidence.from_spectrum(spectrum, num_samples, eps, tol, max_iter)
    return _check_finite_result(result, gram_DD.dtype)


_gram_sums_spectrum = jax.jit(gram_spectrum_from_sums)


def logme_from_factor(
    r_factor,
    dim: int,
    num_samples,
    *,
    eps: float = 1e-5,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
) -> LogMEResult:
    """LogME from a square-root factor of [F | Y]'s Gram matrix, by the "factor" method of `logme`.

    Any A [M, D + C] with AᵀA = [F | Y]ᵀ[F | Y] will do: the rows themselves, an R factor of
    them, or R of the streamed rows stacked batch by batch (`scoring.stats`). A is re-factored
    by one QR (O((D + C)³), once), so it need not be triangular. Equals
    `logme(F, Y, regression=True, method="factor")`, with the same float32 accuracy.

    Args:
        r_factor: [M, D + C] the factor.
        dim: D, the number of feature columns (the rest are target columns).
        num_samples: N, the number of rows factored (a scalar; may be a device array).
        eps, tol, max_iter: see `logme`.

    Returns:
        `LogMEResult`, computed in the dtype of `r_factor`.

    Raises:
        ValueError: a shape that does not fit `dim`, non-finite entries, or N < 2.
    """
    r_factor = inputs.check_features(r_factor, name="r_factor", min_samples=1)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int ≥ 1; got {dim!r}")
    if not r_factor.shape[1] > dim:
        raise ValueError(
            f"r_factor must have shape [M, D + C] with D={dim} and C ≥ 1; got "
            f"{tuple(r_factor.shape)}"
        )
    _check_num_samples(num_samples)
    _check_solver_args(eps, tol, max_iter)
    num_samples = jnp.asarray(num_samples, r_factor.dtype)
    spectrum = _factor_spectrum(r_factor, num_samples, dim=dim)
    result = evidence.from_spectrum(spectrum, num_samples, eps, tol, max_iter)
    return _check_finite_result(result, r_factor.dtype)


@functools.partial(jax.jit, static_argnames="dim")
def _factor_spectrum(r_factor, num_samples, *, dim) -> Spectrum:
    """The spectrum of the features of a factor of [F | Y]'s Gram matrix, noise dropped."""
    # Scale F's columns by a power of two: a factor of [F·2^−e | Y] (columns scale alike).
    scaled_feats, scale_exp = power_of_two_scale(r_factor[:, :dim])
    scaled = jnp.linalg.qr(jnp.concatenate([scaled_feats, r_factor[:, dim:]], axis=1), mode="r")
    spectrum = factor_spectrum_from_r(scaled, dim)._replace(scale_exp=scale_exp)
    # F has N rows, so at most N directions carry anything: in an R factor of N < D rows (zero
    # rows included) the others are rounding noise, as is anything under the numerical-rank
    # tolerance (max(M, D)·eps·σ_max on σ). The SVD lists σ in descending order.
    eig_K = spectrum.eig_K
    rank_tol = jnp.max(eig_K) * (max(r_factor.shape) * jnp.finfo(eig_K.dtype).eps) ** 2
    index_K = jnp.arange(eig_K.shape[0])
    signal_K = (index_K < num_samples) & (eig_K > rank_tol)
    # a dropped direction's target coordinates move to the residual outside span(F)
    dropped_p2_C = jnp.sum(jnp.where(signal_K[:, None], 0, spectrum.proj_KC**2), axis=0)
    spectrum = spectrum._replace(
        eig_K=jnp.where(signal_K, eig_K, 0),
        lift_DK=jnp.where(signal_K[None, :], spectrum.lift_DK, 0),
        proj_KC=jnp.where(signal_K[:, None], spectrum.proj_KC, 0),
        res_out_C=spectrum.res_out_C + dropped_p2_C,
    )
    return spectrum


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
    return jnp.matmul(feats_ND, result.weights.T.astype(feats_ND.dtype), precision=HIGHEST)
