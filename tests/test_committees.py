"""Ensembles and the adaptive cascade executor (jaxmodels.committees.executors) on 8 fake CPU devices.

References are independent of the code under test: each member's logits come from a plain
`jax.jit(model.apply)` on host-normalised images (no mesh, no buckets, no vmap), and the
cascade's decisions are recomputed in float64 NumPy (softmax, mean of logits, conf > t).
Members are tiny jaxmodels ResNets and a ViT with He-scaled random weights whose linear head is
centred and scaled, so that predictions and confidences vary across images.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from cascade_reference import reference_stages
from tiny_classifier import random_variables

import jaxmodels
from jaxmodels.committees import rules as cascade_rules
from jaxmodels.committees.executors import Cascade, Ensemble, Member, simulate_cascade
from jaxmodels.committees.online import OnlineCascade, request_latency
from jaxmodels.inference import row_batches

NUM_CLASSES = 5
NUM_IMAGES = 37  # divisible by neither the 8 devices nor any bucket
RESNET = dict(width=4, stage_sizes=(1, 1))
VIT = dict(depth=1, image_size=16)


# ----------------------------------------------------------------------------- references


@functools.cache
def _reference_apply(model):
    return jax.jit(functools.partial(model.apply, train=False))  # the module's own apply


def reference_logits(member: Member, images: np.ndarray) -> np.ndarray:
    """logits_NK of one member: host normalisation, one plain jitted apply."""
    x = images
    if images.dtype == np.uint8:
        x = jaxmodels.data.preprocess.normalize(images, member.preprocessing)
    return np.asarray(_reference_apply(member.apply_fn.module)(member.variables, jnp.asarray(x)))


def reference_exits(conf_MN, thresholds):
    """First stage k with conf_k > t_k, else the last."""
    exit_N = np.full(conf_MN.shape[1], len(conf_MN) - 1)
    for n in range(conf_MN.shape[1]):
        for k, t in enumerate(thresholds):
            if conf_MN[k, n] > t:
                exit_N[n] = k
                break
    return exit_N


def separating_threshold(conf_N, quantile, min_gap=1e-4):
    """A threshold in a gap ≥ min_gap of the sorted confidences, near the given quantile."""
    values = np.sort(conf_N)
    gaps = np.flatnonzero(np.diff(values) >= min_gap)
    i = gaps[np.argmin(np.abs(gaps - quantile * len(values)))]
    return float((values[i] + values[i + 1]) / 2)


# ----------------------------------------------------------------------------- members


def he_variables(model, image_size, seed):
    """random_variables' tree with He-scaled kernels, unit norms and zero running means."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = jax.tree_util.keystr(path)
        if key.endswith("['kernel']"):
            fan_in = np.prod(leaf.shape[:-1])
            return np.sqrt(2.0 / fan_in) * rng.standard_normal(leaf.shape).astype(np.float32)
        if key.endswith("['var']") or key.endswith("['scale']"):
            return np.ones(leaf.shape, np.float32)
        if key.endswith("['mean']"):
            return np.zeros(leaf.shape, np.float32)
        return 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, random_variables(model, image_size, seed))


def make_member(name, seed, images, **overrides) -> Member:
    """A member whose head is centred and scaled on `images` (logits spread ~ 2 per class)."""
    model = jaxmodels.create(name, num_classes=NUM_CLASSES, **overrides)
    size = images.shape[1]
    spec = jaxmodels.spec(name, num_classes=NUM_CLASSES, **{"image_size": size, **overrides})
    variables = he_variables(model, size, seed)
    member = Member(model, variables, spec.flops_per_image, spec.preprocessing, f"{name}{seed}")
    raw = reference_logits(member, images)
    head = variables["params"]["fc" if name.startswith("resnet") else "head"]
    scale = 2.0 / raw.std(axis=0).mean()
    head["kernel"] = head["kernel"] * scale
    head["bias"] = (head["bias"] - raw.mean(axis=0)) * scale
    return member


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    u8_32 = rng.integers(0, 256, (NUM_IMAGES, 32, 32, 3), dtype=np.uint8)
    vit_prep = jaxmodels.spec("vit_tiny", image_size=16).preprocessing
    f_16 = jaxmodels.data.preprocess.normalize(u8_32[:, ::2, ::2], vit_prep)  # float: used as given
    return {"u8_32": u8_32, "f_16": f_16}


@pytest.fixture(scope="module")
def resnets(images):
    """Four ResNets of one architecture (different seeds) and their reference logits."""
    members = [make_member("resnet_tiny", seed, images["u8_32"], **RESNET) for seed in range(4)]
    return members, np.stack([reference_logits(m, images["u8_32"]) for m in members])


@pytest.fixture(scope="module")
def vit(images):
    member = make_member("vit_tiny", 10, images["f_16"], **VIT)
    return member, reference_logits(member, images["f_16"])


@pytest.fixture(scope="module")
def wide_resnet(images):
    member = make_member("resnet_tiny", 20, images["u8_32"], width=8, stage_sizes=(1, 1))
    return member, reference_logits(member, images["u8_32"])


@pytest.fixture(scope="module")
def cascade_members(images, resnets, vit, wide_resnet):
    """Three members of three architectures, by rising FLOPs, their inputs and logits_MNK."""
    (small, *_), small_logits = resnets[0], resnets[1][0]
    items = [
        (small, images["u8_32"], small_logits),
        (vit[0], images["f_16"], vit[1]),
        (wide_resnet[0], images["u8_32"], wide_resnet[1]),
    ]
    items.sort(key=lambda item: item[0].flops)
    assert len({item[0].flops for item in items}) == 3
    members, inputs, logits = zip(*items, strict=True)
    return list(members), list(inputs), np.stack(logits)


# ----------------------------------------------------------------------------- ensembles


def test_logits_vary_across_images(resnets, vit, wide_resnet):
    """Guards the fixtures: predictions differ between images, so agreement below means much."""
    for logits_NK in [*resnets[1], vit[1], wide_resnet[1]]:
        assert len(np.unique(logits_NK.argmax(-1))) >= 3


def test_ensemble_equals_hand_computed_mean(images, resnets, vit):
    (a, b, *_), logits = resnets
    members = [a, vit[0], b]
    inputs = [images["u8_32"], images["f_16"], images["u8_32"]]
    ref_MNK = np.stack([logits[0], vit[1], logits[1]]).astype(np.float64)

    ensemble = Ensemble(members, batch_size=40, strategy="vmap")  # one batch: 37 rows in 40
    assert ensemble.groups == ((0, 2), (1,))
    np.testing.assert_allclose(ensemble.logits(inputs), ref_MNK.mean(0), atol=2e-5)
    np.testing.assert_array_equal(ensemble.predict(inputs), ref_MNK.mean(0).argmax(-1))

    weighted = Ensemble(members, weights=[1.0, 2.0, 1.0], batch_size=40)
    expected = (ref_MNK[0] + 2 * ref_MNK[1] + ref_MNK[2]) / 4
    np.testing.assert_allclose(weighted.logits(inputs), expected, atol=2e-5)

    probs = Ensemble(members, combine="probs", weights=[1.0, 0.0, 3.0], batch_size=40)
    p_MNK = scipy.special.softmax(ref_MNK, axis=-1)
    expected = np.log((p_MNK[0] + 3 * p_MNK[2]) / 4)
    np.testing.assert_allclose(probs.logits(inputs), expected, atol=2e-5)


def test_same_architecture_vmap_equals_member_loop(images, resnets):
    members, logits_MNK = resnets
    ensemble = Ensemble(members, batch_size=16, strategy="vmap")
    assert ensemble.groups == ((0, 1, 2, 3),)  # one vmap over stacked variables
    np.testing.assert_allclose(ensemble.member_logits(images["u8_32"]), logits_MNK, atol=2e-5)
    np.testing.assert_allclose(ensemble.logits(images["u8_32"]), logits_MNK.mean(0), atol=2e-5)
    sequential = Ensemble(members, batch_size=16, strategy="sequence")
    assert sequential.groups == ((0,), (1,), (2,), (3,))
    np.testing.assert_allclose(sequential.member_logits(images["u8_32"]), logits_MNK, atol=2e-5)
    mapped = Ensemble(members, batch_size=16, strategy="lax.map")  # one stack, one at a time
    assert mapped.groups == ((0, 1, 2, 3),)
    np.testing.assert_allclose(mapped.member_logits(images["u8_32"]), logits_MNK, atol=2e-5)


def test_ensemble_with_default_batch_pads_to_a_bucket(images, resnets):
    members, logits_MNK = resnets
    ensemble = Ensemble(members[:2])
    assert ensemble.batch_size == 256 and ensemble.buckets[:4] == (8, 16, 32, 48)  # 37 rows → 48
    np.testing.assert_allclose(ensemble.logits(images["u8_32"]), logits_MNK[:2].mean(0), atol=2e-5)


def test_ensemble_bad_input(images, resnets):
    members = resnets[0]
    with pytest.raises(ValueError, match="members must not be empty"):
        Ensemble([])
    with pytest.raises(TypeError, match="members"):
        Ensemble(members[0])
    with pytest.raises(ValueError, match="combine"):
        Ensemble(members, combine="vote")
    with pytest.raises(ValueError, match="weights must have one value per member"):
        Ensemble(members, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        Ensemble(members, weights=[1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        Ensemble(members, batch_size=12)
    ensemble = Ensemble(members[:2], batch_size=16)
    with pytest.raises(ValueError, match="same N"):
        ensemble.logits([images["u8_32"], images["u8_32"][:5]])
    with pytest.raises(ValueError, match="one array for all members or one per member"):
        ensemble.logits([images["u8_32"]])
    with pytest.raises(ValueError, match=r"\[N>0, H, W, 3\]"):
        ensemble.logits(images["u8_32"][..., :1])
    bare = [Member(m.apply_fn, m.variables, m.flops) for m in members[:2]]
    with pytest.raises(ValueError, match="no preprocessing"):
        Ensemble(bare, batch_size=16).logits(images["u8_32"])
    with pytest.raises(ValueError, match="flops must be positive"):
        Member(members[0].apply_fn, members[0].variables, 0.0)


class _PoolingHead(nn.Module):
    """A user's own Flax module, outside jaxmodels: no `train` argument, its own signature."""

    classes: int

    @nn.compact
    def __call__(self, images_BHWC):
        return nn.Dense(self.classes)(images_BHWC.mean(axis=(1, 2)))


def test_any_apply_function_is_a_member(images, resnets):
    x = images["u8_32"]
    resnet, resnet_logits = resnets[0][0], resnets[1][0]
    head = _PoolingHead(NUM_CLASSES)
    variables = head.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
    prep = resnet.preprocessing

    def plain(variables, images_BHWC):  # a bare function, not a module
        return images_BHWC.reshape(len(images_BHWC), -1)[:, :NUM_CLASSES] * variables["scale"]

    own = Member(head.apply, variables, resnet.flops / 2, prep, "own module")
    bare = Member(plain, {"scale": np.float32(3.0)}, resnet.flops / 4, prep, "function")
    x_normalised = np.asarray(jaxmodels.data.preprocess.normalize(x, prep))
    own_logits = np.asarray(head.apply(variables, x_normalised))
    bare_logits = 3.0 * x_normalised.reshape(NUM_IMAGES, -1)[:, :NUM_CLASSES]
    ensemble = Ensemble([bare, own, resnet], batch_size=16)
    np.testing.assert_allclose(
        ensemble.member_logits(x), [bare_logits, own_logits, resnet_logits], atol=2e-5
    )
    out = Cascade([bare, own, resnet], [0.6, 0.5], batch_size=16).run(x)
    logits_MNK = np.stack([bare_logits, own_logits, resnet_logits])
    simulated = simulate_cascade(
        logits_MNK, [0.6, 0.5], costs=[m.flops for m in (bare, own, resnet)]
    )
    np.testing.assert_array_equal(out.exit_stage, simulated.exit_stage)
    assert len(set(out.exit_stage)) > 1
    with pytest.raises(TypeError, match="apply_fn must be a function"):
        Member("resnet", variables, 1.0)


def test_non_finite_member_logits_raise(images, resnets):
    good = resnets[0][0]
    variables = jax.tree.map(lambda x: x, good.variables)
    variables["params"]["fc"]["bias"] = np.full(NUM_CLASSES, np.nan, np.float32)
    broken = Member(good.apply_fn, variables, good.flops * 2, good.preprocessing, "broken")
    few = images["u8_32"][:8]
    with pytest.raises(ValueError, match="non-finite"):
        Ensemble([good, broken], batch_size=8).logits(few)
    with pytest.raises(ValueError, match=r"stage 1 \(broken\) produced non-finite"):
        Cascade([good, broken], [1.0], batch_size=8).run(few)


# ----------------------------------------------------------------------------- cascade


@pytest.mark.parametrize(
    "rule, confidence, batch_size, buckets",
    [
        ("ensemble", "max_prob", 16, None),
        ("single", "margin", 24, (8,)),
        ("ensemble", "neg_entropy", 16, None),
    ],
)
def test_adaptive_cascade_equals_simulation(cascade_members, rule, confidence, batch_size, buckets):
    members, inputs, logits_MNK = cascade_members
    combined_MNK, conf_MN = reference_stages(logits_MNK, rule, confidence)
    thresholds = [separating_threshold(conf_MN[0], 0.5), separating_threshold(conf_MN[1], 0.4)]
    cascade = Cascade(
        members, thresholds, confidence=confidence, rule=rule, batch_size=batch_size,
        buckets=buckets,
    )  # fmt: skip
    out = cascade.run(inputs)
    simulated = simulate_cascade(
        logits_MNK, thresholds, confidence=confidence, rule=rule, costs=[m.flops for m in members]
    )
    np.testing.assert_array_equal(out.exit_stage, simulated.exit_stage)
    np.testing.assert_array_equal(out.predictions, simulated.predictions)
    np.testing.assert_allclose(out.logits, simulated.logits, atol=2e-5)

    # ... and both equal the float64 recomputation from the definitions.
    exit_N = reference_exits(conf_MN, thresholds)
    np.testing.assert_array_equal(out.exit_stage, exit_N)
    assert set(exit_N) == {0, 1, 2}  # every stage answers someone
    answer_NK = combined_MNK[exit_N, np.arange(NUM_IMAGES)]
    np.testing.assert_array_equal(out.predictions, answer_NK.argmax(-1))
    np.testing.assert_allclose(out.logits, answer_NK, atol=2e-5)
    cost_N = np.cumsum([m.flops for m in members])[exit_N]
    assert out.avg_flops == pytest.approx(cost_N.mean(), rel=1e-12)
    assert out.worst_case_flops == cost_N.max()
    np.testing.assert_allclose(out.exit_fractions, np.bincount(exit_N) / NUM_IMAGES)
    assert out.wall_seconds > 0 and simulated.wall_seconds is None


def test_cascade_compiles_once_per_stage_and_bucket(cascade_members):
    members, inputs, logits_MNK = cascade_members
    traces = []

    def counting_max_prob(probs_BC):
        traces.append(probs_BC.shape)  # runs at trace time only
        return jnp.max(probs_BC, axis=-1)

    _, conf_MN = reference_stages(logits_MNK, "ensemble", "max_prob")
    thresholds = [separating_threshold(conf_MN[0], 0.5), separating_threshold(conf_MN[1], 0.5)]
    cascade = Cascade(members, thresholds, confidence=counting_max_prob, batch_size=16)
    assert cascade.buckets == (8, 16)
    # A run may call each stage at each bucket: the warm-up compiles exactly those, ahead.
    assert cascade.warmup(inputs) == len(traces) == 2 * len(members)
    # 37 rows on 8 devices are 5 per device, in calls of the buckets' 16/8 = 2 and 8/8 = 1 rows
    # per device (2, 2, 1 at stage 0): the model steps run on batches of 16 and 8.
    assert {s[0] for s in traces} == {8, 16}
    first = cascade.run(inputs)
    assert len(traces) == 2 * len(members)  # the run compiled nothing
    again = Cascade(members, thresholds, confidence=counting_max_prob, batch_size=16).run(inputs)
    assert len(traces) == 2 * len(members)  # a new Cascade of the same pieces reuses them
    fewer = cascade.run([x[:12] for x in inputs])  # 2 rows per device, in smaller blocks
    assert len(traces) == 2 * len(members)  # the model steps depend on the bucket, not on N
    np.testing.assert_array_equal(fewer.exit_stage, first.exit_stage[:12])
    np.testing.assert_array_equal(again.exit_stage, first.exit_stage)


def test_float32_thresholds_decide_as_the_float64_ones():
    rng = np.random.default_rng(0)
    near_K = rng.random(500).astype(np.float32).astype(np.float64)
    t_K = np.concatenate([near_K - 1e-12, near_K, near_K + 1e-12, rng.random(500)])
    t32_K = cascade_rules.float32_thresholds(t_K)
    assert t32_K.dtype == np.float32
    # every float32 confidence within two ulps of each threshold, on both sides
    c_JK = np.stack([t_K.astype(np.float32)] * 5)
    for j, steps in enumerate((-2, -1, 1, 2)):
        for _ in range(abs(steps)):
            c_JK[j] = np.nextafter(c_JK[j], np.float32(np.sign(steps) * np.inf))
    np.testing.assert_array_equal(c_JK > t32_K, c_JK.astype(np.float64) > t_K)


def test_default_buckets_are_coarse_off_the_cpu():
    fine = row_batches.default_buckets(256, 1)
    assert sorted(fine) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert sorted(row_batches.default_buckets(256, 1, coarse=True)) == [2**k for k in range(9)]
    assert sorted(row_batches.default_buckets(256, 8, coarse=True)) == [8, 16, 32, 64, 128, 256]


def test_cascade_keeps_rows_on_the_devices_between_stages(cascade_members, monkeypatch):
    """Inputs go up once and answers come down once: between stages only [S] counts do."""
    members, inputs, logits_MNK = cascade_members
    _, conf_MN = reference_stages(logits_MNK, "ensemble", "max_prob")
    thresholds = [separating_threshold(conf_MN[0], 0.5), separating_threshold(conf_MN[1], 0.5)]
    cascade = Cascade(members, thresholds, batch_size=16)
    cascade.warmup(inputs)
    fetched, converted = [], []
    device_get, array_type = jax.device_get, type(jnp.zeros(1))
    to_numpy = array_type.__array__

    def spy_get(tree):
        fetched.append(jax.tree.map(np.shape, tree))
        with monkeypatch.context() as inner:  # device_get itself may convert
            inner.setattr(array_type, "__array__", to_numpy)
            return device_get(tree)

    def spy_numpy(x, *args, **kwargs):  # np.asarray(device array): a fetch on any backend
        converted.append(x.shape)
        return to_numpy(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_get", spy_get)
    monkeypatch.setattr(array_type, "__array__", spy_numpy)
    with jax.transfer_guard("disallow"):  # no implicit transfer anywhere in a run
        out = cascade.run(inputs)
    monkeypatch.undo()
    assert converted == []
    per_stage = [((8,), (8,))] * len(members)  # next counts and non-finite flags, one per device
    assert fetched[:-1] == per_stage[: len(fetched) - 1]
    rows = 8 * 8  # 37 images on 8 devices: 5 rows each, in blocks of 8
    assert fetched[-1] == ((rows,), (rows, logits_MNK.shape[-1]))  # exit stages, answers, once
    assert set(out.exit_stage) == {0, 1, 2}


def test_cascade_with_everyone_exiting_first(cascade_members):
    members, inputs, logits_MNK = cascade_members
    out = Cascade(members, [0.0, 0.0], batch_size=16).run(inputs)
    np.testing.assert_array_equal(out.exit_stage, 0)
    assert out.avg_flops == out.worst_case_flops == members[0].flops
    np.testing.assert_allclose(out.logits, logits_MNK[0], atol=2e-5)


def test_cascade_bad_input(cascade_members):
    members, inputs, _ = cascade_members
    with pytest.raises(ValueError, match="members must not be empty"):
        Cascade([], [])
    with pytest.raises(ValueError, match="ordered by cost"):
        Cascade(members[::-1], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        Cascade(members, [0.5])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Cascade(members, [0.5, 1.5])
    with pytest.raises(ValueError, match="NaN"):
        Cascade(members, [0.5, np.nan], confidence="neg_entropy")
    with pytest.raises(ValueError, match="rule"):
        Cascade(members, [0.5, 0.5], rule="vote")
    with pytest.raises(ValueError, match="confidence must be one of"):
        Cascade(members, [0.5, 0.5], confidence="entropy")
    with pytest.raises(ValueError, match="must not exceed batch_size"):
        Cascade(members, [0.5, 0.5], batch_size=16, buckets=(8, 32))
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        Cascade(members, [0.5, 0.5], batch_size=16, buckets=(4,))
    with pytest.raises(ValueError, match="one array for all members or one per member"):
        Cascade(members, [0.5, 0.5], batch_size=16).run(inputs[:2])


# ----------------------------------------------------------------------------- confidences


def test_confidence_functions_on_known_probabilities():
    probs = jnp.asarray([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [1.0, 0.0, 0.0]], jnp.float32)
    np.testing.assert_allclose(cascade_rules.max_prob(probs), [0.5, 0.8, 1.0])
    np.testing.assert_allclose(cascade_rules.margin(probs), [0.2, 0.7, 1.0], atol=1e-7)
    expected = [sum(p * np.log(p) for p in row if p > 0) for row in np.asarray(probs, np.float64)]
    np.testing.assert_allclose(cascade_rules.neg_entropy(probs), expected, rtol=1e-6)


def synthetic_logits(num_members=3, n=200, c=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    strength = rng.uniform(0.0, 3.0, n)[:, None] * np.eye(c)[labels]
    return np.stack([rng.normal(0, 1, (n, c)) + strength for _ in range(num_members)]).astype(
        np.float32
    )


@pytest.mark.parametrize(
    "rule, confidence",
    [
        *itertools.product(["ensemble", "single"], ["max_prob", "margin", "neg_entropy"]),
        ("ensemble", lambda p: p[..., 0] - p[..., 1]),
    ],
)
def test_each_confidence_exit_rule(rule, confidence):
    logits_MNC = synthetic_logits()
    combined_MNC, conf_MN = reference_stages(logits_MNC, rule, confidence)
    thresholds = [separating_threshold(conf_MN[0], 0.3), separating_threshold(conf_MN[1], 0.6)]
    out = simulate_cascade(
        logits_MNC, thresholds, confidence=confidence, rule=rule, costs=[1.0, 2.0, 5.0]
    )
    exit_N = reference_exits(conf_MN, thresholds)
    np.testing.assert_array_equal(out.exit_stage, exit_N)
    answer_NC = combined_MNC[exit_N, np.arange(exit_N.size)]
    np.testing.assert_array_equal(out.predictions, answer_NC.argmax(-1))
    np.testing.assert_allclose(out.logits, answer_NC, atol=1e-5)
    assert out.avg_flops == pytest.approx(np.array([1.0, 3.0, 8.0])[exit_N].mean())


def test_exit_is_strictly_above_the_threshold():
    logits_MNC = synthetic_logits(num_members=2)
    _, conf_MN = cascade_rules.stage_outputs(logits_MNC)
    n = int(np.argsort(conf_MN[0])[100])
    at = simulate_cascade(logits_MNC, [float(conf_MN[0, n])])
    assert at.exit_stage[n] == 1  # conf == threshold stays
    below = simulate_cascade(logits_MNC, [float(np.nextafter(conf_MN[0, n], -1))])
    assert below.exit_stage[n] == 0
    np.testing.assert_array_equal(simulate_cascade(logits_MNC, [1.0]).exit_stage, 1)
    np.testing.assert_array_equal(simulate_cascade(logits_MNC, [0.0]).exit_stage, 0)


def test_simulate_bad_input():
    logits_MNC = synthetic_logits()
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        simulate_cascade(logits_MNC, [0.5])
    with pytest.raises(ValueError, match="costs must have one cost per member"):
        simulate_cascade(logits_MNC, [0.5, 0.5], costs=[1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        simulate_cascade(logits_MNC, [0.5, 0.5], costs=[1.0, 0.0, 2.0])
    nan = logits_MNC.copy()
    nan[1, 7, 2] = np.nan
    with pytest.raises(ValueError, match=r"member 1 .*first at example 7"):
        simulate_cascade(nan, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[M members, N examples, C classes\]"):
        simulate_cascade(logits_MNC[0], [])
    with pytest.raises(ValueError, match="at least 2 classes"):
        simulate_cascade(logits_MNC[..., :1], [0.5, 0.5], confidence="margin")
    with pytest.raises(ValueError, match="conf \\[N\\]"):
        simulate_cascade(logits_MNC, [0.5, 0.5], confidence=lambda p: p)


def test_auto_strategy_returns_the_measured_winner(images, resnets, monkeypatch):
    """A fake clock makes lax.map the fastest, best of three interleaved rounds of one batch
    each (vmap, lax.map, sequence, in that order); "auto" then runs lax.map, and a second
    ensemble of the same signature reuses the cached winner without timing again."""
    from jaxmodels.committees import executors

    members, logits_MNK = resnets
    # three interleaved rounds; best of each: vmap 2 s, lax.map 1 s, sequence 3 s
    # (the last round alone would pick vmap)
    durations = np.array([9, 1, 9, 5, 4, 3, 2, 9, 9], float)
    starts = np.cumsum(durations) - durations
    ticks = iter(np.column_stack([starts, starts + durations]).ravel().tolist())
    monkeypatch.setattr(executors, "_clock", lambda: next(ticks))
    monkeypatch.setattr(executors, "_AUTO_WINNERS", {})
    ensemble = Ensemble(members[:2], batch_size=16)
    np.testing.assert_allclose(ensemble.logits(images["u8_32"]), logits_MNK[:2].mean(0), atol=2e-5)
    assert ensemble.chosen_strategy == "lax.map" and ensemble.groups == ((0, 1),)
    again = Ensemble(members[:2], batch_size=16)
    again.logits(images["u8_32"])  # the clock is spent: a second measurement would raise
    assert again.chosen_strategy == "lax.map"


def test_auto_strategy_measures_the_program_it_then_runs(images, resnets, monkeypatch):
    """Members sharing one image array are measured sharing it (one upload, the shared-images
    program), so every candidate's timed program is the one a run with those images calls."""
    from jaxmodels import jit_cache
    from jaxmodels.committees import executors

    members, _ = resnets
    monkeypatch.setattr(executors, "_AUTO_WINNERS", {})
    x = images["u8_32"][:16]  # one batch: the measured shapes are the run's
    ensemble = Ensemble(members[:2], batch_size=16)
    ensemble.logits(x)
    compiled = jit_cache.size()
    for strategy in executors.STRATEGIES:
        ensemble._with_strategy(strategy).logits(x)
    assert jit_cache.size() == compiled  # nothing compiled anew: each was measured as run


# ----------------------------------------------------------------------------- online


def test_online_cascade_answers_each_request_as_the_batch_cascade(cascade_members):
    """Requests of 1..8 images padded to 8 rows, one jitted call each: the same exits and
    logits as `Cascade.run` on all images; padding never keeps a request's later stages alive."""
    members, inputs, logits_MNK = cascade_members
    _, conf_MN = reference_stages(logits_MNK, "ensemble", "max_prob")
    thresholds = [separating_threshold(conf_MN[0], 0.5), separating_threshold(conf_MN[1], 0.4)]
    cascade = Cascade(members, thresholds, batch_size=16)
    batch = cascade.run(inputs)
    online = OnlineCascade(cascade, max_rows=8)
    start, exits = 0, []
    for n in (1, 8, 3, 5, 2, 7, 4, 6):
        logits_NK, exit_N = online([x[start : start + n] for x in inputs])
        np.testing.assert_array_equal(exit_N, batch.exit_stage[start : start + n])
        np.testing.assert_allclose(logits_NK, batch.logits[start : start + n], atol=2e-5)
        exits.extend(exit_N)
        start += n
    assert set(exits) == {0, 1, 2}  # every stage answered some request
    settled = OnlineCascade(Cascade(members, [0.0, 0.0], batch_size=16), max_rows=8)
    _, exit_N = settled([x[:3] for x in inputs])
    np.testing.assert_array_equal(exit_N, 0)
    with pytest.raises(ValueError, match="a request holds 1 to 8 images; got 9"):
        online([x[:9] for x in inputs])
    latency = request_latency(
        lambda images: online([x[: len(images)] for x in inputs]), inputs[0], requests=4
    )
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] and latency["requests"] == 4


def test_online_cascade_runs_a_later_stage_only_for_an_undecided_real_row(cascade_members):
    """Stages run, counted by a callback in the confidence: a request that stage 0 settles runs
    one stage even though its zero padding rows would not be settled."""
    members, inputs, logits_MNK = cascade_members
    calls = []

    def counted_max_prob(probs_BC):
        jax.debug.callback(lambda _: calls.append(1), probs_BC[0, 0])
        return jnp.max(probs_BC, axis=-1)

    _, conf_MN = reference_stages(logits_MNK, "ensemble", "max_prob")
    thresholds = [separating_threshold(conf_MN[0], 0.5), separating_threshold(conf_MN[1], 0.4)]
    cascade = Cascade(members, thresholds, confidence=counted_max_prob, batch_size=16)
    zeros = [np.zeros((8, *x.shape[1:]), x.dtype) for x in inputs]
    assert (cascade.run(zeros).exit_stage > 0).all()  # padding alone would go on
    first = np.flatnonzero(cascade.run(inputs).exit_stage == 0)[:3]
    last = np.flatnonzero(cascade.run(inputs).exit_stage == 2)[:1]
    online = OnlineCascade(cascade, max_rows=8)
    online([x[first] for x in inputs])  # compile
    calls.clear()
    _, exit_N = online([x[first] for x in inputs])
    assert list(exit_N) == [0, 0, 0] and len(calls) == 1
    calls.clear()
    _, exit_N = online([x[np.concatenate([first, last])] for x in inputs])
    assert list(exit_N) == [0, 0, 0, 2] and len(calls) == 3
