"""scoring: numbers about models without training them — LogME and its peers, rank metrics."""

from scoring import stats
from scoring.evidence import LogMEResult
from scoring.gbc import gbc
from scoring.hscore import hscore
from scoring.inputs import LabelWarning
from scoring.leep import leep
from scoring.logme import logme, logme_from_factor, logme_from_gram, logme_predict
from scoring.nce import nce
from scoring.nleep import nleep
from scoring.rank_correlation import (
    RankAgreement,
    kendall_tau,
    rank_agreement,
    spearman_rho,
    top1_regret,
    weighted_kendall_tau,
)
from scoring.regularized_hscore import regularized_hscore
from scoring.sfda import sfda
from scoring.stats import (
    LeepPass,
    ScoreStats,
    hscore_from_stats,
    leep_from_stats,
    logme_from_stats,
    nce_from_stats,
)
from scoring.transrate import transrate

__all__ = [
    "LabelWarning",
    "LeepPass",
    "LogMEResult",
    "RankAgreement",
    "ScoreStats",
    "gbc",
    "hscore",
    "hscore_from_stats",
    "kendall_tau",
    "leep",
    "leep_from_stats",
    "logme",
    "logme_from_factor",
    "logme_from_gram",
    "logme_from_stats",
    "logme_predict",
    "nce",
    "nce_from_stats",
    "nleep",
    "rank_agreement",
    "regularized_hscore",
    "sfda",
    "spearman_rho",
    "stats",
    "top1_regret",
    "transrate",
    "weighted_kendall_tau",
]
