"""LogME against the public reference implementation's outputs and against exact identities."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import scoring
from scoring import evidence, spectrum
from scoring.evidence import MAX_ITER, REFERENCE_STOP, TOL, from_spectrum

FIXTURES = np.load(pathlib.Path(__file__).parent / "fixtures" / "logme_reference.npz")
CASES = sorted({k.split("/")[0] for k in FIXTURES.files if not k.startswith("src")})
TALL_CASES = [c for c in CASES if f"{c}/alpha" in FIXTURES.files]


def case(name):
    """(features [N, D] float64, targets, regression) of a fixture case."""
    feats = FIXTURES[f"{name}/features"]
    if f"{name}/targets" in FIXTURES.files:
        return feats, FIXTURES[f"{name}/targets"], True
    return feats, FIXTURES[f"{name}/labels"], False


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_fixture_has_the_documented_cases():
    assert set(CASES) == {
        "cls_tall", "cls_wide", "cls_lowrank", "cls_scaled", "cls_many",
        "reg_multi", "reg_wide", "multilabel",
    }  # fmt: skip


@pytest.mark.parametrize("method", ["gram", "factor"])
@pytest.mark.parametrize("name", CASES)
def test_score_matches_reference_in_float64(x64, name, method):
    feats, targets, regression = case(name)
    result = scoring.logme(feats, targets, regression=regression, method=method, **REFERENCE_STOP)
    assert result.score.dtype == jnp.float64
    np.testing.assert_allclose(float(result.score), FIXTURES[f"{name}/score"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", ["gram", "factor"])
@pytest.mark.parametrize("name", TALL_CASES)
def test_parameters_and_predictions_match_reference_in_float64(x64, name, method):
    feats, targets, regression = case(name)
    result = scoring.logme(feats, targets, regression=regression, method=method, **REFERENCE_STOP)
    np.testing.assert_allclose(result.alpha, FIXTURES[f"{name}/alpha"], rtol=1e-6)
    np.testing.assert_allclose(result.beta, FIXTURES[f"{name}/beta"], rtol=1e-6)
    np.testing.assert_allclose(result.weights, FIXTURES[f"{name}/weights"], rtol=1e-6, atol=0)
    preds = np.asarray(scoring.logme_predict(result, feats))
    if regression:
        np.testing.assert_allclose(preds, FIXTURES[f"{name}/predict"], rtol=1e-6, atol=1e-12)
    else:
        np.testing.assert_array_equal(preds.argmax(-1), FIXTURES[f"{name}/predict"])


def test_wide_case_differs_from_reference_default_code_as_documented():
    # Issue #23 of the reference: its default path forgets the zero eigenvalues when N < D.
    for name in ("cls_wide", "reg_wide"):
        assert abs(FIXTURES[f"{name}/score"] - FIXTURES[f"{name}/score_reference_code"]) > 1.0


@pytest.mark.parametrize("name", CASES)
def test_float32_score_is_close_to_float64(name):
    feats, targets, regression = case(name)
    targets = targets.astype(np.float32) if regression else targets
    result = scoring.logme(
        feats.astype(np.float32), targets, regression=regression, **REFERENCE_STOP
    )
    assert result.score.dtype == jnp.float32
    assert np.all(np.isfinite(result.evidence))
    np.testing.assert_allclose(float(result.score), FIXTURES[f"{name}/score"], rtol=2e-5)


def spectrum_task(kind, n, d, c, seed=0):
    """Classification features [N, D] with a given singular spectrum, rotated at random.

    Class centres lie along every direction, including the weak ones (as in deep features, whose
    low-variance directions still separate classes), so those directions carry evidence.
    kinds: "flat"; "decaying", feature variances from 1 to 1e-8 (Gram condition number ~1e8);
    "low_rank", a quarter of the directions with variance 1 and the rest exactly 0.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % c
    spread = {
        "flat": np.ones(d),
        "decaying": np.logspace(0, -4, d),
        "low_rank": (np.arange(d) < d // 4).astype(float),
    }[kind]
    centers = rng.normal(size=(c, d)) * spread
    coords = rng.normal(size=(n, d)) * spread + centers[labels]
    rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return coords @ rotation.T, labels


SPECTRA = [
    (kind, n, d) for kind in ("flat", "decaying", "low_rank") for n, d in ((300, 40), (30, 60))
]


@pytest.mark.parametrize(("kind", "n", "d"), SPECTRA)
def test_float32_matches_float64_on_flat_decaying_and_low_rank_spectra(kind, n, d):
    # The bar of the issue is 1e-3; the "factor" method gives ~1e-6. A "gram" path in float32
    # (λ resolved to eps·λ_max, then a cutoff) is off by 10-50 % on the decaying spectrum, and
    # a cutoff on σ of √eps·σ_max (λ_max·eps on λ) drops directions that carry the classes.
    feats, labels = spectrum_task(kind, n, d, 4)
    with jax.enable_x64(True):
        want = scoring.logme(feats, labels)
        if kind == "decaying" and n > d:
            assert np.linalg.cond(feats) ** 2 > 1e7  # the Gram condition number of the issue
    got = scoring.logme(feats.astype(np.float32), labels)
    assert got.score.dtype == jnp.float32
    np.testing.assert_allclose(float(got.score), float(want.score), rtol=1e-4)
    np.testing.assert_allclose(
        np.asarray(got.evidence), np.asarray(want.evidence), rtol=1e-4, atol=1e-5
    )


def test_float32_matches_float64_on_the_benchmark_task():
    # scripts/benchmarks/logme.py's make_task at a small size: class means plus noise whose spread
    # decays over the dimensions (Gram condition number ~5e6 at this size).
    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "scripts" / "benchmarks"))
    from logme import make_task  # scripts/benchmarks/logme.py

    feats, labels = make_task(600, 64, 6)
    with jax.enable_x64(True):
        want = float(scoring.logme(feats, labels).score)
    np.testing.assert_allclose(
        float(scoring.logme(feats.astype(np.float32), labels).score), want, rtol=1e-4
    )


def test_gram_method_drops_rank_noise_in_float32():
    # N < D, features of rank 20 < N = 60 and targets they fit to 1e-3: the kernel FFᵀ has 40
    # eigenvalues that are float32 rounding (up to ~1e-6·λ_max), far above α/β. Dropped by the
    # cutoff max(N, D)·eps·λ_max they are harmless; kept (cutoff 0, or λ_max·eps), each adds a
    # spurious direction the near-exact fit pays log(λ/t) for, and the score moves by 1-10 %.
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, 20)) @ rng.normal(size=(20, 150))
    targets = feats @ rng.normal(size=(150, 2)) / np.sqrt(150) + 1e-3 * rng.normal(size=(60, 2))
    with jax.enable_x64(True):
        want = float(scoring.logme(feats, targets, regression=True).score)
    got = scoring.logme(
        feats.astype(np.float32), targets.astype(np.float32), regression=True, method="gram"
    )
    np.testing.assert_allclose(float(got.score), want, rtol=1e-3)


def one_hot_targets(name):
    feats, targets, regression = case(name)
    if regression:
        return feats, targets
    return feats, (targets[:, None] == np.unique(targets)[None]).astype(np.float64)


@pytest.mark.parametrize("name", ["cls_tall", "cls_wide", "reg_multi", "reg_wide"])
def test_evidence_equals_gaussian_marginal_likelihood_at_convergence(x64, name):
    # log p(y | F, α, β) = log N(y; 0, I/β + F Fᵀ/α), computed densely with SciPy.
    feats, targets_NC = one_hot_targets(name)
    result = scoring.logme(feats, targets_NC, regression=True, eps=0.0, tol=1e-13, max_iter=500)
    n = feats.shape[0]
    for c in range(targets_NC.shape[1]):
        alpha, beta = float(result.alpha[c]), float(result.beta[c])
        cov = np.eye(n) / beta + feats @ feats.T / alpha
        log_p = scipy.stats.multivariate_normal(np.zeros(n), cov).logpdf(targets_NC[:, c])
        # 1e-7: when N < D the fit is near-exact, β is large and the dense covariance is
        # ill-conditioned, which costs SciPy's Cholesky a few digits.
        np.testing.assert_allclose(float(result.evidence[c]) * n, log_p, rtol=1e-7)


@pytest.mark.parametrize("name", ["cls_tall", "cls_lowrank", "reg_multi", "reg_wide"])
@pytest.mark.parametrize(("tol", "rtol"), [(1e-13, 1e-8), (1e-3, 2e-2)])
def test_stationarity_identities_hold(x64, name, tol, rtol):
    # At a fixed point α‖m‖² = γ and β‖Fm − y‖² = N − γ, with γ = Σ λ/(λ + α/β).
    feats, targets_NC = one_hot_targets(name)
    result = scoring.logme(feats, targets_NC, regression=True, eps=0.0, tol=tol, max_iter=500)
    # The nonzero spectrum from the smaller of FᵀF and FFᵀ: the other one's zero eigenvalues come
    # out of eigvalsh as noise, which matters when α/β is tiny (N < D fits y almost exactly).
    small_gram = feats.T @ feats if feats.shape[0] >= feats.shape[1] else feats @ feats.T
    eig = np.clip(np.linalg.eigvalsh(small_gram), 0, None)
    for c in range(targets_NC.shape[1]):
        alpha, beta = float(result.alpha[c]), float(result.beta[c])
        m = np.asarray(result.weights[c])
        gamma = np.sum(eig / (eig + alpha / beta))
        n = feats.shape[0]
        np.testing.assert_allclose(alpha * m @ m, gamma, rtol=rtol)
        residual = beta * np.sum((feats @ m - targets_NC[:, c]) ** 2)
        # When N < D both sides are ~0 (y is fit exactly), so compare absolutely there.
        np.testing.assert_allclose(residual, n - gamma, rtol=rtol, atol=1e-6)


def test_classification_equals_regression_on_one_hot_columns(x64):
    feats, labels, _ = case("cls_many")
    by_labels = scoring.logme(feats, labels)
    by_one_hot = scoring.logme(feats, one_hot_targets("cls_many")[1], regression=True)
    np.testing.assert_allclose(by_labels.evidence, by_one_hot.evidence, rtol=1e-12)


def test_labels_need_not_be_contiguous_but_get_a_warning(x64):
    feats, labels, _ = case("cls_tall")
    relabelled = np.array([3, 7, 9, 20, 21])[labels]
    with pytest.warns(scoring.LabelWarning, match=r"\{3: 78, 7: 100, 9: 85, 20: 77, 21: 100\}"):
        result = scoring.logme(feats, relabelled, **REFERENCE_STOP)
    np.testing.assert_allclose(result.score, FIXTURES["cls_tall/score"], atol=1e-8)


@pytest.mark.parametrize("name", ["cls_tall", "cls_wide", "reg_multi"])
def test_jit_matches_no_jit(name):
    feats, targets, regression = case(name)
    feats = feats.astype(np.float32)
    if regression:
        targets = targets.astype(np.float32)
        kwargs = dict(regression=True)
    else:
        kwargs = dict(num_classes=int(targets.max()) + 1)
    kwargs.update(REFERENCE_STOP)  # compared with the reference's outputs below
    with jax.disable_jit():  # the inner jit too: every op runs eagerly
        eager = scoring.logme(feats, targets, **kwargs)
    jitted = jax.jit(scoring.logme, static_argnames=("regression", "num_classes"))(
        feats, targets, **kwargs
    )
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(jitted.score), FIXTURES[f"{name}/score"], atol=2e-3)


def test_jit_with_traced_solver_arguments():
    feats, targets, _ = case("reg_multi")
    fn = jax.jit(scoring.logme, static_argnames="regression")
    a = fn(
        feats.astype(np.float32), targets.astype(np.float32), regression=True, max_iter=3, tol=1e-4
    )
    b = scoring.logme(
        feats.astype(np.float32), targets.astype(np.float32), regression=True, max_iter=3, tol=1e-4
    )
    np.testing.assert_allclose(a.score, b.score, rtol=1e-6)


def test_jit_with_abstract_labels_needs_num_classes():
    feats, labels, _ = case("cls_tall")
    with pytest.raises(ValueError, match="num_classes"):
        jax.jit(scoring.logme, static_argnames="regression")(feats.astype(np.float32), labels)


def test_max_iter_bounds_the_fixed_point(x64):
    feats, targets, _ = case("reg_multi")
    one_step = scoring.logme(feats, targets, regression=True, max_iter=1)
    # After one step from α = β = 1: α = γ/(‖m‖² + eps) with m = (FᵀF + I)⁻¹Fᵀy.
    gram = feats.T @ feats
    m = np.linalg.solve(gram + np.eye(gram.shape[0]), feats.T @ targets[:, 0])
    gamma = np.trace(np.linalg.solve(gram + np.eye(gram.shape[0]), gram))
    np.testing.assert_allclose(float(one_step.alpha[0]), gamma / (m @ m + 1e-5), rtol=1e-9)


def test_logme_from_gram_equals_logme(x64):
    for name in ("cls_many", "reg_multi", "cls_lowrank"):
        feats, targets_NC = one_hot_targets(name)
        direct = scoring.logme(feats, targets_NC, regression=True)
        streamed = scoring.logme_from_gram(
            feats.T @ feats, feats.T @ targets_NC, np.sum(targets_NC**2, 0), feats.shape[0]
        )
        for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(streamed), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_every_form_shares_one_compiled_fixed_point(x64):
    """`logme` passes N as a Python int, the streamed forms as an array, a caller's eps may be a
    float or an array: one fixed-point program between them for one shape (a shape no other test
    uses, so that the first call compiles here)."""
    solver = evidence._solve_spectrum
    rng = np.random.default_rng(7)
    feats, targets_NC = rng.normal(size=(41, 7)), rng.normal(size=(41, 2))
    before = solver._cache_size()
    results = [
        scoring.logme(feats, targets_NC, regression=True, method="gram"),
        scoring.logme_from_gram(
            feats.T @ feats,
            feats.T @ targets_NC,
            np.sum(targets_NC**2, 0),
            np.float64(41),
            eps=np.float64(1e-5),
        ),
        scoring.logme_from_factor(np.hstack([feats, targets_NC]), 7, 41, max_iter=np.int64(100)),
    ]
    assert solver._cache_size() - before == 1
    for result in results[1:]:
        np.testing.assert_allclose(result.score, results[0].score, rtol=1e-9)


def test_integer_features_are_scored_in_float32():
    rng = np.random.default_rng(0)
    feats = rng.integers(-5, 5, size=(50, 4))
    labels = rng.integers(0, 3, size=50)
    result = scoring.logme(feats, labels)
    assert result.score.dtype == jnp.float32 and np.isfinite(float(result.score))


# Bad input: each raises a clear error naming the argument, before any heavy work.

GOOD_FEATS = np.random.default_rng(1).normal(size=(20, 5)).astype(np.float32)
GOOD_LABELS = np.arange(20) % 3


@pytest.mark.parametrize(
    ("features", "targets", "kwargs", "error", "match"),
    [
        (
            np.where(np.eye(20, 5) > 0, np.nan, GOOD_FEATS),
            GOOD_LABELS,
            {},
            ValueError,
            "features must be finite; found 5",
        ),
        (
            np.where(np.eye(20, 5) > 0, np.inf, GOOD_FEATS),
            GOOD_LABELS,
            {},
            ValueError,
            "features must be finite",
        ),
        (GOOD_FEATS[:1], GOOD_LABELS[:1], {}, ValueError, "at least 2 samples"),
        (GOOD_FEATS[:, :0], GOOD_LABELS, {}, ValueError, "D=0"),
        (GOOD_FEATS[0], GOOD_LABELS, {}, ValueError, r"features must have shape \[N, D\]"),
        (GOOD_FEATS, np.zeros(20, int), {}, ValueError, "at least 2 classes"),
        (GOOD_FEATS, GOOD_LABELS[:19], {}, ValueError, "targets has 19 entries"),
        (GOOD_FEATS, GOOD_LABELS + 0.5, {}, TypeError, "regression=True"),
        (
            GOOD_FEATS,
            np.stack([GOOD_LABELS] * 2, 1),
            {},
            ValueError,
            r"targets must have shape \[N\]",
        ),
        (GOOD_FEATS, GOOD_LABELS, {"num_classes": 2}, ValueError, "num_classes=2"),
        (GOOD_FEATS, GOOD_LABELS, {"num_classes": 1}, ValueError, "num_classes must be an int ≥ 2"),
        (GOOD_FEATS, GOOD_LABELS, {"max_iter": 0}, ValueError, "max_iter"),
        (GOOD_FEATS, GOOD_LABELS, {"tol": -1.0}, ValueError, "tol"),
        (GOOD_FEATS, GOOD_LABELS, {"eps": float("nan")}, ValueError, "eps"),
        (
            GOOD_FEATS,
            np.full((20, 2), np.nan),
            {"regression": True},
            ValueError,
            "targets must be finite",
        ),
        (GOOD_FEATS, np.ones((19, 2)), {"regression": True}, ValueError, "targets has 19 rows"),
        (GOOD_FEATS, np.ones((20, 0)), {"regression": True}, ValueError, "at least one column"),
        ("features", GOOD_LABELS, {}, TypeError, "features must be a real-valued array"),
        ({"a": 1}, GOOD_LABELS, {}, TypeError, "features must be an array"),
        (GOOD_FEATS.astype(bool), GOOD_LABELS, {}, TypeError, "real-valued"),
    ],
)
def test_bad_input_raises(features, targets, kwargs, error, match):
    with pytest.raises(error, match=match):
        scoring.logme(features, targets, **kwargs)


def test_bad_statistics_raise():
    gram = GOOD_FEATS.T @ GOOD_FEATS
    with pytest.raises(ValueError, match="fty_DC must have D=5 rows"):
        scoring.logme_from_gram(gram, np.ones((4, 2)), np.ones(2), 20)
    with pytest.raises(ValueError, match="yy_C must have C=2"):
        scoring.logme_from_gram(gram, np.ones((5, 2)), np.ones(3), 20)
    with pytest.raises(ValueError, match="num_samples"):
        scoring.logme_from_gram(gram, np.ones((5, 2)), np.ones(2), 1)
    with pytest.raises(ValueError, match="gram_DD must be finite"):
        scoring.logme_from_gram(gram * np.nan, np.ones((5, 2)), np.ones(2), 20)


def test_predict_rejects_mismatched_dimensions():
    result = scoring.logme(GOOD_FEATS, GOOD_LABELS)
    with pytest.raises(ValueError, match="D=4 dimensions but the result was fit on D=5"):
        scoring.logme_predict(result, GOOD_FEATS[:, :4])


@pytest.mark.parametrize("num_samples", [20, 36])
def test_from_an_r_factor_with_fewer_rows_than_features(num_samples):
    # A streamed R factor has D + C rows, most of them zero when N < D: at most N directions
    # carry anything, and counting the spectrum's size instead gave log(N − D) = NaN.
    rng = np.random.default_rng(5)
    dim, classes = 64, 3
    decay_D = np.logspace(0, -3, dim)  # a deep-feature spectrum, not a flat one
    feats_ND = (rng.standard_normal((num_samples, dim)) * decay_D).astype(np.float32)
    labels_N = np.arange(num_samples) % classes
    targets_NC = np.eye(classes, dtype=np.float32)[labels_N]
    r_factor = np.linalg.qr(np.concatenate([feats_ND, targets_NC], axis=1), mode="r")
    padded = np.zeros((dim + classes, dim + classes), np.float32)
    padded[: r_factor.shape[0]] = r_factor
    from_factor = scoring.logme_from_factor(jnp.asarray(padded), dim, num_samples)
    with jax.enable_x64(True):
        exact = float(scoring.logme(feats_ND.astype(np.float64), labels_N).score)
    assert np.isfinite(float(from_factor.score))
    assert float(from_factor.score) == pytest.approx(exact, rel=1e-4, abs=1e-5)


def exact_evidence(feats_ND, labels_N, num_classes, eps=1e-5):
    """The exact LogME score: float64 SVD of F, every direction kept, the reference's fixed point
    (α = β = 1 start, eps in both denominators) iterated until t = α/β stops changing."""
    n, d = feats_ND.shape
    u_NK, sigma_K, _ = np.linalg.svd(feats_ND, full_matrices=False)
    lam_K = sigma_K**2
    evidence = []
    for c in range(num_classes):
        y_N = (labels_N == c).astype(np.float64)
        p_K = u_NK.T @ y_N
        res_out = y_N @ y_N - p_K @ p_K
        alpha, beta = 1.0, 1.0
        for _ in range(100_000):
            gamma = np.sum(beta * lam_K / (alpha + beta * lam_K))
            m2 = np.sum(beta**2 * lam_K * p_K**2 / (alpha + beta * lam_K) ** 2)
            res2 = np.sum((alpha * p_K / (alpha + beta * lam_K)) ** 2) + res_out
            t = alpha / beta
            alpha, beta = gamma / (m2 + eps), (n - gamma) / (res2 + eps)
            if abs(alpha / beta - t) <= 1e-15 * t:
                break
        m2 = np.sum(beta**2 * lam_K * p_K**2 / (alpha + beta * lam_K) ** 2)
        res2 = np.sum((alpha * p_K / (alpha + beta * lam_K)) ** 2) + res_out
        log_p = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - np.sum(np.log(alpha + beta * lam_K)) / 2
            - (d - len(lam_K)) / 2 * np.log(alpha)
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * np.log(2 * np.pi)
        )
        evidence.append(log_p / n)
    return float(np.mean(evidence))


def signal_features(span, everywhere, n=2000, d=64, c=4, seed=1):
    """Features whose singular values fall log-evenly from 1 to `span`, with class means in
    every direction at the same signal-to-noise (`everywhere`) or decaying with the spectrum."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    means_CD = 1.5 * rng.normal(size=(c, d))
    if not everywhere:
        means_CD = means_CD * np.logspace(0, -6, d)
    z_ND = rng.normal(size=(n, d)) + means_CD[labels]
    return z_ND / z_ND.std(0) * np.logspace(0, np.log10(span), d), labels, c


@pytest.mark.parametrize("everywhere", [True, False], ids=["signal-everywhere", "signal-decays"])
@pytest.mark.parametrize("span", [1e-3, 1e-4, 1e-5, 1e-6])
def test_exact_when_small_directions_carry_signal(span, everywhere):
    """The defaults reach the maximum evidence: float64 within 1e-6 of the exact one for σ down
    to 1e-6 of σ_max, and so is float32 (its D×D step runs in float64 on CPU: a float32 SVD there
    was 3e-3 off at 1e-6). The reference's stopping rule (tol 1e-3, 11 steps) is 1e-2 off once
    σ spans 1e-5 with signal everywhere."""
    feats, labels, c = signal_features(span, everywhere)
    exact = exact_evidence(feats, labels, c)
    with jax.enable_x64(True):
        got64 = float(scoring.logme(feats, labels, num_classes=c).score)
        reference_stop = float(scoring.logme(feats, labels, num_classes=c, **REFERENCE_STOP).score)
    got32 = float(scoring.logme(feats.astype(np.float32), labels, num_classes=c).score)
    np.testing.assert_allclose(got64, exact, rtol=1e-6)
    np.testing.assert_allclose(got32, exact, rtol=1e-6)
    if everywhere and span <= 1e-5:  # what the defaults fix
        assert abs(reference_stop / exact - 1) > 1e-3


@pytest.mark.parametrize("span", [1e-4, 1e-6])
def test_float32_step_where_the_backend_lacks_float64(span, monkeypatch):
    """On TPU the D×D step is a float32 SVD: within 1e-6 of the exact evidence down to σ spans
    of 1e-4 and within 1e-2 at 1e-6, where the float64 step is within 1e-6."""
    feats, labels, c = signal_features(span, everywhere=True)
    exact = exact_evidence(feats, labels, c)
    feats32 = jnp.asarray(feats, jnp.float32)
    spectra = {}
    for available in (True, False):
        monkeypatch.setattr(spectrum, "float64_step_available", lambda a=available: a)
        spectra[available] = spectrum.factor_spectrum(feats32, jnp.asarray(labels), c)
    got = {k: float(from_spectrum(s, len(labels), 1e-5, TOL, MAX_ITER).score)
           for k, s in spectra.items()}  # fmt: skip
    np.testing.assert_allclose(got[True], exact, rtol=1e-6)
    np.testing.assert_allclose(got[False], exact, rtol=1e-6 if span >= 1e-4 else 1e-2)
    if span < 1e-4:  # the float64 step is what resolves the smallest directions
        assert abs(got[False] / exact - 1) > 10 * abs(got[True] / exact - 1)


@pytest.mark.parametrize("scale", [2.0**-60, 1e-6, 1e6, 2.0**70])
def test_gram_route_on_both_sides_of_the_unscaled_sums_window(scale):
    """float32 "gram": FᵀF is formed from F itself while max |F| lies within 2^±16 and from F
    scaled by a power of two beyond (F at 2^70 squares past float32's range). Either way it
    agrees with the "factor" route, which always scales."""
    rng = np.random.default_rng(0)
    feats = (rng.normal(size=(200, 12)) * scale).astype(np.float32)
    labels = np.arange(200) % 4
    gram = scoring.logme(feats, labels, method="gram")
    factor = scoring.logme(feats, labels, method="factor")
    assert np.isfinite(float(gram.score))
    np.testing.assert_allclose(gram.evidence, factor.evidence, rtol=1e-5)
