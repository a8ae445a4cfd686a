"""How well a transferability score ranks models: rank correlations with fine-tuned accuracy.

The weighted Kendall τ (Vigna, "A Weighted Correlation Index for Rankings with Ties", WWW 2015) is
the measure LogME and its successors report (You et al., ICML 2021): discordant pairs among the
best models cost more than among the worst, with hyperbolic weights 1/(r + 1) on the rank r. It
is computed by `scipy.stats.weightedtau` with its defaults (ranks from the accuracies and the scores
decreasing, averaged over both), so numbers are comparable with the published tables. Also Kendall's
τ-b, Spearman's ρ, and the regret of trusting the score's top pick.

Scores that agree to `TIE_DIGITS` significant digits are ties: float64 scoring resolves no
finer, and a score that saturates (the H-score is C − 1 for every model whose features have
D ≥ N − 1 dimensions) must not rank models by its rounding noise.

Dimension names: M models.
"""

from typing import NamedTuple

import numpy as np
import scipy.stats

TIE_DIGITS = 10


class RankAgreement(NamedTuple):
    """How a score's ranking of M models agrees with their accuracies.

    Attributes:
        weighted_tau: weighted Kendall τ (hyperbolic weights), in [−1, 1].
        kendall_tau: Kendall's τ-b, in [−1, 1].
        spearman_rho: Spearman's ρ, in [−1, 1].
        top1_regret: best accuracy − accuracy of the model the score ranks first (≥ 0).
    """

    weighted_tau: float
    kendall_tau: float
    spearman_rho: float
    top1_regret: float


def _tied(values) -> np.ndarray:
    """`values` rounded to `TIE_DIGITS` significant digits: equal there means tied."""
    return np.array([float(f"{v:.{TIE_DIGITS}g}") for v in values])


def all_tied(scores) -> bool:
    """Whether `scores` rank no model above another (all tied): no correlation is defined."""
    return len(set(_tied(scores).tolist())) == 1


def _check_pair(scores, accuracies, *, ranked: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Checks [M] scores and accuracies; `ranked`: both must also rank the models (not all tied),
    as every rank correlation is 0/0 when one side has a single value."""
    pairs = []
    for name, values in (("scores", scores), ("accuracies", accuracies)):
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a 1-D sequence of numbers; got {values!r}") from err
        if array.ndim != 1:
            raise ValueError(f"{name} must have shape [M]; got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(
                f"{name} must be finite; found {int(np.sum(~np.isfinite(array)))} NaN/inf values"
            )
        pairs.append(array)
    scores_M, accs_M = pairs
    scores_M = _tied(scores_M)
    if scores_M.shape != accs_M.shape:
        raise ValueError(
            f"scores and accuracies must have one entry per model; got {scores_M.shape[0]} "
            f"scores and {accs_M.shape[0]} accuracies"
        )
    if scores_M.shape[0] < 2:
        raise ValueError(f"need at least 2 models to correlate rankings; got {scores_M.shape[0]}")
    if ranked:
        for name, array in (("scores", scores_M), ("accuracies", accs_M)):
            if np.all(array == array[0]):
                raise ValueError(
                    f"{name} are all equal ({array[0]:g} for all {array.shape[0]} models): they "
                    "rank no model above another, so a rank correlation is undefined"
                )
    return scores_M, accs_M


def weighted_kendall_tau(scores, accuracies) -> float:
    """Weighted Kendall τ between a score and the accuracies of M models.

    Args:
        scores: [M] transferability scores (higher = predicted better).
        accuracies: [M] fine-tuned accuracies of the same models.

    Returns:
        τ_w in [−1, 1]: `scipy.stats.weightedtau(accuracies, scores)` with hyperbolic weighting and
        rank=True (the ranking by each variable, averaged), as in the LogME papers.

    Raises:
        TypeError, ValueError: non-numeric, non-finite, differently sized inputs, M < 2, or
          scores or accuracies that are all equal (the correlation is 0/0).
    """
    scores_M, accs_M = _check_pair(scores, accuracies)
    return float(scipy.stats.weightedtau(accs_M, scores_M).statistic)


def kendall_tau(scores, accuracies) -> float:
    """Kendall's τ-b between scores and accuracies (`scipy.stats.kendalltau`); args as above."""
    scores_M, accs_M = _check_pair(scores, accuracies)
    return float(scipy.stats.kendalltau(scores_M, accs_M).statistic)


def spearman_rho(scores, accuracies) -> float:
    """Spearman's ρ between scores and accuracies (`scipy.stats.spearmanr`); args as above."""
    scores_M, accs_M = _check_pair(scores, accuracies)
    return float(scipy.stats.spearmanr(scores_M, accs_M).statistic)


def top1_regret(scores, accuracies) -> float:
    """max(accuracies) − accuracy of the highest-scoring model (ties: the first such model).

    Args:
        scores: [M] transferability scores.
        accuracies: [M] fine-tuned accuracies.

    Returns:
        The regret (≥ 0, in the accuracies' units); 0 when the score picks a best model.
    """
    scores_M, accs_M = _check_pair(scores, accuracies, ranked=False)
    return float(np.max(accs_M) - accs_M[int(np.argmax(scores_M))])


def rank_agreement(scores, accuracies) -> RankAgreement:
    """All four measures at once (see the functions above)."""
    return RankAgreement(
        weighted_kendall_tau(scores, accuracies),
        kendall_tau(scores, accuracies),
        spearman_rho(scores, accuracies),
        top1_regret(scores, accuracies),
    )
