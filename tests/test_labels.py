"""Class labels: a stray value (99 among 0–4, or −1) is never silently scored as a class."""

import warnings

import numpy as np
import pytest

import scoring

N, D, C = 60, 6, 5


def task():
    rng = np.random.default_rng(0)
    labels = np.arange(N) % C
    feats = rng.normal(size=(N, D)) + rng.normal(size=(C, D))[labels]
    logits = rng.normal(size=(N, 7)) + 2 * np.eye(C, 7)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return feats, labels, probs


SCORES = {
    "logme": lambda f, y, p: scoring.logme(f, y),
    "hscore": lambda f, y, p: scoring.hscore(f, y),
    "regularized_hscore": lambda f, y, p: scoring.regularized_hscore(f, y),
    "transrate": lambda f, y, p: scoring.transrate(f, y),
    "gbc": lambda f, y, p: scoring.gbc(f, y),
    "sfda": lambda f, y, p: scoring.sfda(f, y),
    "nleep": lambda f, y, p: scoring.nleep(f, y, components_per_class=1),
    "leep": lambda f, y, p: scoring.leep(p, y),
    "nce": lambda f, y, p: scoring.nce(p.argmax(1), y),
}


@pytest.mark.parametrize(
    ("stray", "counts"),
    [
        (99, r"\{0: 12, 1: 12, 2: 11, 3: 12, 4: 12, 99: 1\}"),
        (-1, r"\{-1: 1, 0: 12, 1: 12, 2: 11, 3: 12, 4: 12\}"),
    ],
)
@pytest.mark.parametrize("name", SCORES)
def test_a_stray_label_warns_and_lists_the_class_counts(name, stray, counts):
    feats, labels, probs = task()
    labels = labels.copy()
    labels[7] = stray  # one sample of class 2 mislabelled
    with pytest.warns(scoring.LabelWarning, match=f"found 6 distinct values with counts {counts}"):
        SCORES[name](feats, labels, probs)


@pytest.mark.parametrize("name", SCORES)
def test_labels_0_to_c_minus_1_give_no_warning(name):
    feats, labels, probs = task()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SCORES[name](feats, labels, probs)


def test_with_num_classes_a_stray_label_is_an_error():
    feats, labels, _ = task()
    labels[7] = 99
    with pytest.raises(ValueError, match=r"must lie in \[0, num_classes=5\); found values in"):
        scoring.logme(feats, labels, num_classes=5)


def test_many_classes_list_the_rarest_first():
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.repeat(np.arange(1, 21), 3), [500]])  # 1-based, and a stray 500
    feats = rng.normal(size=(labels.size, 4))
    with pytest.warns(scoring.LabelWarning, match=r"\{500: 1, 1: 3, .*\.\.\. \(21 classes\)\}"):
        scoring.hscore(feats, labels)
