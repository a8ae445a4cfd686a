"""Rank correlations on small examples checked by hand."""

import numpy as np
import pytest

import scoring


def test_weighted_tau_hand_checked_examples():
    # Hyperbolic weights 1/(r + 1) on ranks r = 0, 1, 2, 3: w = 1, 1/2, 1/3, 1/4; a pair weighs
    # w_i + w_j, so all 6 pairs weigh 3·(1 + 1/2 + 1/3 + 1/4) = 6.25 in total.
    accs = [4.0, 3.0, 2.0, 1.0]
    # Only the two worst models are swapped: the discordant pair weighs 1/3 + 1/4 = 7/12, by the
    # accuracies' ranking and by the scores' ranking alike, so τ_w = (6.25 − 2·7/12) / 6.25.
    np.testing.assert_allclose(
        scoring.weighted_kendall_tau([4.0, 3.0, 1.0, 2.0], accs), (6.25 - 7 / 6) / 6.25, rtol=1e-12
    )
    # The two best swapped: the pair weighs 1 + 1/2, so τ_w = (6.25 − 3) / 6.25 = 0.52: swapping
    # at the top costs more than at the bottom (plain Kendall τ is 2/3 in both cases).
    np.testing.assert_allclose(
        scoring.weighted_kendall_tau([3.0, 4.0, 2.0, 1.0], accs), 0.52, rtol=1e-12
    )
    np.testing.assert_allclose(scoring.kendall_tau([3.0, 4.0, 2.0, 1.0], accs), 2 / 3)
    np.testing.assert_allclose(scoring.kendall_tau([4.0, 3.0, 1.0, 2.0], accs), 2 / 3)
    np.testing.assert_allclose(scoring.weighted_kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]), 1.0)
    np.testing.assert_allclose(scoring.weighted_kendall_tau([4, 3, 2, 1], [10, 20, 30, 40]), -1.0)


def test_spearman_and_regret_hand_checked():
    accs = [0.9, 0.8, 0.7, 0.6]
    scores = [0.1, 0.5, 0.3, 0.2]  # ranks the second-best model first
    # Ranks of scores (1 = lowest): [1, 4, 3, 2]; of accs: [4, 3, 2, 1]; d = [−3, 1, 1, 1],
    # Σd² = 12, ρ = 1 − 6·12 / (4·15) = −0.2.
    np.testing.assert_allclose(scoring.spearman_rho(scores, accs), -0.2, rtol=1e-12)
    np.testing.assert_allclose(scoring.top1_regret(scores, accs), 0.1, rtol=1e-12)
    assert scoring.top1_regret(accs, accs) == 0.0
    agreement = scoring.rank_agreement(scores, accs)
    assert agreement.top1_regret == pytest.approx(0.1)
    assert agreement.spearman_rho == pytest.approx(-0.2)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="one entry per model"):
        scoring.weighted_kendall_tau([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 models"):
        scoring.kendall_tau([1], [1])
    with pytest.raises(ValueError, match="scores must be finite"):
        scoring.spearman_rho([1, np.nan], [1, 2])
    with pytest.raises(ValueError, match=r"accuracies must have shape \[M\]"):
        scoring.top1_regret([1, 2], [[1, 2]])
    with pytest.raises(TypeError, match="scores must be a 1-D sequence of numbers"):
        scoring.weighted_kendall_tau(["a", "b"], [1, 2])


@pytest.mark.parametrize(
    "fn", [scoring.weighted_kendall_tau, scoring.kendall_tau, scoring.spearman_rho]
)
def test_all_tied_scores_or_accuracies_are_an_error_not_nan(fn):
    with pytest.raises(ValueError, match="scores are all equal"):
        fn([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="accuracies are all equal"):
        fn([0.1, 0.2, 0.3], [0.9, 0.9, 0.9])
    # Partial ties are ranks with ties, which τ-b and ρ handle.
    assert np.isfinite(fn([0.5, 0.5, 0.7], [0.1, 0.2, 0.3]))
    # The regret needs no ranking: a tie picks the first model.
    assert scoring.top1_regret([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]) == pytest.approx(0.2)


def test_scores_equal_to_rounding_are_ties():
    """Two models whose H-score saturates at C − 1 differ only in the last bits of float64, and
    which is 'higher' depends on the QR that made them: they must tie, so τ does not move."""
    accs = [0.80, 0.82, 0.70, 0.60]
    one_rounding = [3.9999999999999973, 4.000000000000002, 2.5, 1.0]
    another = [4.000000000000002, 3.9999999999999973, 2.5, 1.0]
    exact = [4.0, 4.0, 2.5, 1.0]
    taus = {scoring.weighted_kendall_tau(s, accs) for s in (one_rounding, another, exact)}
    assert len(taus) == 1
    # a real difference (1e-6 relative) still ranks
    assert scoring.weighted_kendall_tau([4.0, 4.000004, 2.5, 1.0], accs) != taus.pop()
