"""What to deploy: a cascade only when its measured time beats the fastest single model by 1.1×.

The pool is two members on held-out logits built so the cascade's behaviour is known exactly:
member 1 is always right and confident; member 0 is right and confident on 60 % of the examples
and unsure (nearly uniform logits) on the rest. A cascade member 0 → member 1 then answers 60 %
at stage 0 and matches member 1's accuracy, so its predicted time is
fixed₀ + a·N + fixed₁ + b·0.4·N against fixed₁ + b·N for member 1 alone.
"""

import numpy as np
import pytest

from jaxmodels.committees import deploy
from jaxmodels.committees.members import Member

N, C = 50, 4


def pool_logits():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, N)
    onehot = np.eye(C)[labels]
    sure = np.arange(N) < 0.6 * N
    member0 = np.where(sure[:, None], 8 * onehot, 0.01 * rng.normal(size=(N, C)))
    member1 = 8 * onehot + 0.1 * rng.normal(size=(N, C))
    return np.stack([member0, member1]).astype(np.float32), labels


def costs(per_image, fixed=(0.0, 0.0)):
    return deploy.StageCosts(np.asarray(per_image, float), np.asarray(fixed, float))


def test_a_cascade_predicted_faster_by_enough_is_deployed():
    logits, labels = pool_logits()
    # 0.5·N + 1·0.4·N = 0.9·N against N: 1.11×
    chosen = deploy.choose(logits, labels, costs([0.5, 1.0]), target_accuracy=1.0)
    assert chosen.is_cascade and chosen.members == (0, 1) and chosen.message == ""
    assert chosen.single == 1
    np.testing.assert_allclose(chosen.predicted_speedup, 1 / 0.9, rtol=1e-9)
    assert chosen.heldout_accuracy == 1.0


def test_a_cascade_predicted_below_the_margin_is_not_deployed():
    logits, labels = pool_logits()
    # 0.6·N + 0.4·N = N: no faster than member 1 alone
    chosen = deploy.choose(logits, labels, costs([0.6, 1.0]), target_accuracy=1.0, names="ab")
    assert not chosen.is_cascade and chosen.members == (1,)
    assert chosen.predicted_speedup == 1.0
    assert chosen.best_cascade is not None and chosen.best_cascade[0] == (0, 1)
    np.testing.assert_allclose(chosen.best_cascade[2], 1.0, rtol=1e-9)
    assert chosen.message.startswith("serving b alone: the best cascade, a → b, is predicted")


def test_the_fixed_cost_per_stage_counts():
    logits, labels = pool_logits()
    # per image the cascade pays 0.9·N = 45 against 50; a fixed 6 per stage call makes it 57
    chosen = deploy.choose(logits, labels, costs([0.5, 1.0], fixed=(6.0, 0.0)), 1.0)
    assert not chosen.is_cascade
    np.testing.assert_allclose(chosen.best_cascade[2], 50 / 51, rtol=1e-9)


def test_the_baseline_is_the_fastest_single_model_meeting_the_goal():
    logits, labels = pool_logits()
    # Member 0 alone is 60 % accurate: with a 0.5 target it meets the goal and is faster than
    # any cascade that must run it first.
    chosen = deploy.choose(logits, labels, costs([0.5, 1.0]), target_accuracy=0.5)
    assert chosen.members == (0,) and chosen.single == 0


def test_of_equally_fast_single_models_the_more_accurate_is_the_baseline():
    """Members of one architecture share one measured time (`measure_costs`): the held-out
    accuracy decides between them, not the order of the pool."""
    logits, labels = pool_logits()
    # member 0 (60 % accurate) and member 1 (100 %) both meet 0.5 at the same time
    chosen = deploy.choose(logits, labels, costs([1.0, 1.0]), target_accuracy=0.5)
    assert chosen.members == (1,) and chosen.single == 1
    flipped = deploy.choose(logits[::-1], labels, costs([1.0, 1.0]), target_accuracy=0.5)
    assert flipped.members == (0,) and flipped.single == 0


def test_a_cascade_out_of_flops_order_is_not_deployed():
    logits, labels = pool_logits()
    chosen = deploy.choose(logits, labels, costs([0.5, 1.0]), 1.0, flops_M=[2.0, 1.0])
    assert not chosen.is_cascade and "no cascade meets" in chosen.message


def test_predicted_seconds_counts_the_examples_reaching_each_stage():
    line = costs([0.5, 2.0], fixed=(1.0, 3.0))
    exit_N = np.array([0, 0, 1, 1, 1])
    assert deploy.predicted_seconds(line, (0, 1), exit_N) == (1 + 0.5 * 5) + (3 + 2.0 * 3)
    assert deploy.predicted_seconds(line, (0, 1), np.zeros(5, int)) == 1 + 0.5 * 5


def member(apply_fn, width: int, name: str) -> Member:
    return Member(apply_fn, {"w": np.zeros((width,), np.float32)}, 1.0, name=name)


def fake_timing(monkeypatch, truth: dict) -> list:
    """Replaces the executor and the clock: member `name` takes truth[name] = (fixed, per
    image) seconds; returns the names of the members run, in order."""
    ran = []

    class FakeCascade:
        def __init__(self, members, thresholds, batch_size=None):
            self.member = members[0]

        def run(self, images):
            ran.append(self.member.name)
            fixed, per_image = truth[self.member.name]
            return fixed + per_image * len(images)

    monkeypatch.setattr(deploy, "Cascade", FakeCascade)
    monkeypatch.setattr(
        deploy, "best_seconds", lambda runs, repeats: {k: r() for k, r in runs.items()}
    )
    return ran


def test_measure_costs_fits_the_line_through_the_two_sizes(monkeypatch):
    """The timing is replaced by a known line per member: the fit must recover it."""
    fake_timing(monkeypatch, {"m0": (0.02, 0.001), "m1": (0.05, 0.004)})
    members = [member(lambda v, x: x, 2, "m0"), member(lambda v, x: x, 2, "m1")]
    inputs = [np.zeros((40, 2, 2, 3), np.uint8)] * 2
    measured = deploy.measure_costs(members, inputs, repeats=1)
    np.testing.assert_allclose(measured.fixed_M, [0.02, 0.05], rtol=1e-9)
    np.testing.assert_allclose(measured.per_image_M, [0.001, 0.004], rtol=1e-9)
    with pytest.raises(ValueError, match="at least 4 images"):
        deploy.measure_costs(members[:1], [inputs[0][:3]])
    with pytest.raises(TypeError, match=r"members\[1\] must be a Member"):
        deploy.measure_costs([members[0], "m1"], inputs)


def test_members_of_one_program_are_timed_once_and_share_its_line(monkeypatch):
    """Two fine-tunes of one architecture (same apply function and variable shapes) run the
    same program: the first is timed for both, so noise cannot rank them; another width is
    another program, timed on its own."""
    ran = fake_timing(monkeypatch, {"a": (0.02, 0.001), "a-noisy": (0.0, 0.5), "b": (0.05, 0.004)})
    apply_fn = lambda v, x: x
    members = [member(apply_fn, 2, "a"), member(apply_fn, 3, "b"), member(apply_fn, 2, "a-noisy")]
    measured = deploy.measure_costs(members, [np.zeros((40, 2, 2, 3), np.uint8)] * 3)
    assert set(ran) == {"a", "b"}
    np.testing.assert_allclose(measured.fixed_M, [0.02, 0.05, 0.02], rtol=1e-9)
    np.testing.assert_allclose(measured.per_image_M, [0.001, 0.004, 0.001], rtol=1e-9)
