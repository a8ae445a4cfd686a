"""Tests for training.step: what one step changes, its options, and its sharded form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_classifier import init_tiny, random_variables

from jaxmodels import sharding
from jaxmodels.models import paths
from training import flat_sharded, masks, optim
from training import step as step_lib
from training.config import TrainConfig

NUM_CLASSES = 3


def _config(mode="ssf", **kwargs):
    return TrainConfig(**{"mode": mode, "lr": 0.05, "weight_decay": 0.1, "augmentation": "none",
                          **kwargs})  # fmt: skip


def _setup(mode, *, ssf=True, batch_norm=False, **config_kw):
    model, variables = init_tiny(ssf=ssf, batch_norm=batch_norm, num_classes=NUM_CLASSES)
    params = variables["params"]
    mask = masks.trainable_mask(params, mode)
    trainable, _ = masks.split_params(params, mask)
    decay = paths.flatten(masks.weight_decay_mask(params))
    config = _config(mode, **config_kw)
    optimizer, _ = optim.init_optimizer(config, trainable, decay)
    state = step_lib.init_train_state(variables, mask, optimizer, ema=config.ema_decay is not None)
    step = step_lib.make_train_step(model.apply, optimizer, config, NUM_CLASSES)
    return model, variables, state, step


def _batch(seed=0, size=8, batch=8):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32),
    }


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}


SSF_LEAVES = {"ssf_bn/scale", "ssf_bn/shift", "ssf_conv/scale", "ssf_conv/shift",
              "ssf_norm/scale", "ssf_norm/shift"}  # fmt: skip


# eager is slow op by op, so only the ssf mode runs both ways
@pytest.mark.parametrize(
    ("mode", "expected", "jit"),
    [
        ("linear", {"head/bias", "head/kernel"}, True),
        ("ssf", {"head/bias", "head/kernel"} | SSF_LEAVES, True),
        ("ssf", {"head/bias", "head/kernel"} | SSF_LEAVES, False),
        ("bitfit", {"head/bias", "head/kernel", "bn/bias", "conv/bias", "hidden/bias", "norm/bias"},
         True),
    ],
)  # fmt: skip
def test_step_changes_only_the_mode_leaves(mode, expected, jit):
    _, variables, state, step = _setup(mode, batch_norm=True)
    before = paths.flatten(variables["params"])
    step = jax.jit(step) if jit else step
    new_state, metrics = step(state, _batch(), jax.random.key(0))
    after = paths.flatten(new_state.params())
    assert _changed(before, after) == expected
    assert int(new_state.step) == 1
    assert np.isfinite(float(metrics["loss"]))
    # frozen BatchNorm statistics stay as they were outside full fine-tuning
    for k, v in paths.flatten(variables["batch_stats"]).items():
        np.testing.assert_array_equal(paths.flatten(new_state.batch_stats)[k], v)


def test_full_step_changes_every_leaf_and_updates_batch_stats():
    _, variables, state, step = _setup("full", batch_norm=True)
    new_state, _ = jax.jit(step)(state, _batch(), jax.random.key(0))
    before = paths.flatten(variables["params"])
    assert _changed(before, paths.flatten(new_state.params())) == set(before)
    # momentum 0.5: new mean = 0.5·old + 0.5·batch mean of the conv output
    assert _changed(
        paths.flatten(variables["batch_stats"]),
        paths.flatten(new_state.batch_stats),
    ) == {"bn/mean", "bn/var"}


def test_gradient_is_taken_only_wrt_trainable_leaves():
    # the gradient tree the optimizer sees has exactly the trainable keys: frozen leaves are
    # never differentiated (not differentiated then zeroed)
    model, _, state, _ = _setup("ssf")
    seen = {}

    def update(grads, opt_state, params=None):
        seen["keys"] = set(grads)
        return jax.tree.map(jnp.zeros_like, grads), opt_state

    spy = optax.GradientTransformation(lambda p: optax.EmptyState(), update)
    step = step_lib.make_train_step(model.apply, spy, _config(), NUM_CLASSES)
    state = state.replace(opt_state=spy.init(state.trainable))
    step(state, _batch(), jax.random.key(0))
    assert seen["keys"] == set(state.trainable)
    assert not seen["keys"] & set(state.frozen)


def test_ema_is_decay_weighted_average_of_trainable_weights():
    _, _, state, step = _setup("ssf", ema_decay=0.9)
    new_state, _ = jax.jit(step)(state, _batch(), jax.random.key(0))
    for k, old in state.trainable.items():
        expected = 0.9 * np.asarray(old) + 0.1 * np.asarray(new_state.trainable[k])
        np.testing.assert_allclose(np.asarray(new_state.ema[k]), expected, rtol=1e-6, atol=1e-7)
    assert set(new_state.ema) == set(state.trainable)


def test_bfloat16_compute_keeps_float32_master_weights():
    _, _, state, step = _setup("full", bf16=True)
    new_state, metrics = jax.jit(step)(state, _batch(), jax.random.key(0))
    assert all(v.dtype == jnp.float32 for v in new_state.trainable.values())
    assert np.isfinite(float(metrics["loss"]))
    # the loss (of the weights before the update) agrees with a float32 forward to bf16 precision
    model, variables = init_tiny(ssf=True, num_classes=NUM_CLASSES)
    batch = _batch()
    logits = np.asarray(model.apply(variables, batch["image"]), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    loss32 = -log_probs[np.arange(8), np.asarray(batch["label"])].mean()
    np.testing.assert_allclose(float(metrics["loss"]), loss32, rtol=2e-2)


def test_soft_targets_smooth_as_szegedy():
    targets = np.asarray(step_lib.soft_targets(jnp.array([0, 2]), 4, 0.1))
    expected = np.full((2, 4), 0.1 / 4)
    expected[0, 0] += 0.9
    expected[1, 2] += 0.9
    np.testing.assert_allclose(targets, expected, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mixup_mixes_with_the_reversed_batch(jit):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    fn = jax.jit(step_lib.mixup) if jit else step_lib.mixup
    mx, my = fn(jnp.asarray(x), jnp.asarray(y), 0.3)
    np.testing.assert_allclose(np.asarray(mx), 0.3 * x + 0.7 * x[::-1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(my), 0.3 * y + 0.7 * y[::-1], rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_cutmix_label_weight_equals_pasted_area(jit):
    b, h, w = 4, 10, 12
    x = np.broadcast_to(np.arange(b, dtype=np.float32)[:, None, None, None], (b, h, w, 1))
    y = np.eye(b, dtype=np.float32)
    fn = jax.jit(step_lib.cutmix) if jit else step_lib.cutmix
    for seed in range(5):
        mx, my = fn(jnp.asarray(x), jnp.asarray(y), 0.6, jax.random.key(seed))
        mx, my = np.asarray(mx), np.asarray(my)
        for i in range(b):
            pasted = np.mean(mx[i] == b - 1 - i)  # pixels that came from the reversed batch
            np.testing.assert_allclose(my[i, i], 1 - pasted, rtol=1e-6)
            np.testing.assert_allclose(my[i, b - 1 - i], pasted, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mix_picks_mixup_or_cutmix_per_batch(jit):
    config = _config(augmentation="strong")
    assert config.mix_alphas == (0.8, 1.0)
    b = 4
    x = np.broadcast_to(np.arange(b, dtype=np.float32)[:, None, None, None], (b, 6, 6, 1))
    y = np.eye(b, dtype=np.float32)
    mix = lambda key: step_lib._mix(config, jnp.asarray(x), jnp.asarray(y), key)
    mix = jax.jit(mix) if jit else mix
    kinds = set()
    for seed in range(12):
        mx, my = (np.asarray(a) for a in mix(jax.random.key(seed)))
        np.testing.assert_allclose(my.sum(1), 1.0, rtol=1e-6)
        lam = my[0, 0]
        if np.all(np.isin(mx, x)):  # every pixel copied from some image: cutmix
            kinds.add("cutmix")
            np.testing.assert_allclose(np.mean(mx[0] == 0), lam, rtol=1e-6)
        else:  # mixup: λ·x + (1-λ)·x[::-1]
            kinds.add("mixup")
            np.testing.assert_allclose(mx, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)
    assert kinds == {"mixup", "cutmix"}


def test_mixing_weights_are_beta_distributed():
    """Each λ of `symmetric_betas` follows its own Beta(α, α) (Kolmogorov–Smirnov, 4,000 draws),
    and the two λ of one step are independent."""
    alphas = (0.8, 1.0)
    keys = jax.random.split(jax.random.key(0), 4000)
    lams_SM = np.asarray(jax.jit(jax.vmap(lambda k: step_lib.symmetric_betas(k, alphas)))(keys))
    for m, alpha in enumerate(alphas):
        assert scipy.stats.kstest(lams_SM[:, m], scipy.stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert abs(np.corrcoef(lams_SM.T)[0, 1]) < 0.06  # |r| of independent draws: ~0.016


def test_sharded_step_equals_single_device_step():
    _, _, state, step = _setup("ssf", batch_norm=True)
    batch = _batch(batch=16)
    expected, expected_metrics = jax.jit(step)(state, batch, jax.random.key(0))
    mesh = sharding.data_mesh()
    assert mesh.size == 8
    sharded = sharding.shard_local_batch(jax.device_get(batch), mesh)
    assert sharded["image"].sharding == NamedSharding(mesh, P("data"))
    state_r = jax.device_put(state, NamedSharding(mesh, P()))
    got, metrics = jax.jit(step)(state_r, sharded, jax.random.key(0))
    for k in expected.trainable:
        np.testing.assert_allclose(
            np.asarray(got.trainable[k]), np.asarray(expected.trainable[k]), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(float(metrics["loss"]), float(expected_metrics["loss"]), rtol=1e-6)


def test_flat_reduce_step_equals_the_single_device_step():
    """One flat pmean of gradients and loss (training.flat_reduce) on 8 devices gives the step of
    one device. Gradients summed twice (no pcast to varying) would be 8× too large."""
    model, variables, state, _ = _setup("ssf", batch_norm=True)
    _, _, _, step = _setup("ssf", batch_norm=True)
    batch = _batch(batch=16)
    expected, expected_metrics = jax.jit(step)(state, batch, jax.random.key(0))
    mesh = sharding.data_mesh()
    config = _config()
    optimizer = optim.init_optimizer(
        config, state.trainable, paths.flatten(masks.weight_decay_mask(variables["params"]))
    )[0]
    flat_step = step_lib.make_train_step(model.apply, optimizer, config, NUM_CLASSES,
                                         flat_reduce_mesh=mesh)  # fmt: skip
    sharded = sharding.shard_local_batch(jax.device_get(batch), mesh)
    state_r = jax.device_put(state, NamedSharding(mesh, P()))
    key = jax.device_put(jax.random.key(0), NamedSharding(mesh, P()))
    jitted = jax.jit(flat_step)
    jitted(state_r, sharded, key)  # compiles (constants move then)
    with jax.transfer_guard("disallow"):  # the step itself moves nothing through the host
        got, metrics = jax.block_until_ready(jitted(state_r, sharded, key))
    # one all-reduce in the whole step: the flat one
    assert jitted.lower(state_r, sharded, key).compile().as_text().count("all-reduce(") == 1
    for k in expected.trainable:
        np.testing.assert_allclose(
            np.asarray(got.trainable[k]), np.asarray(expected.trainable[k]), rtol=1e-5, atol=1e-6
        )
    for name in ("loss", "grad_norm", "accuracy"):
        np.testing.assert_allclose(float(metrics[name]), float(expected_metrics[name]), rtol=1e-5)


def test_a_head_of_one_class_is_refused():
    model, _ = init_tiny(num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        step_lib.make_train_step(model.apply, optax.sgd(0.1), _config(), 1)


@pytest.mark.parametrize(
    ("name", "mode", "head"),
    [("vit_tiny", "ssf", "head"), ("resnet_tiny", "ssf", "fc")],
)
def test_jaxmodels_step_changes_only_mode_leaves(name, mode, head):
    import jaxmodels

    model = jaxmodels.create(name, num_classes=NUM_CLASSES, ssf=True)
    variables = random_variables(model)  # (random head: ViT's zero head would block gradients)
    params = variables["params"]
    mask = masks.trainable_mask(params, mode, head)
    trainable, _ = masks.split_params(params, mask)
    decay = paths.flatten(masks.weight_decay_mask(params))
    config = _config(mode, lr=0.01)
    optimizer, _ = optim.init_optimizer(config, trainable, decay)
    state = step_lib.init_train_state(variables, mask, optimizer)
    step = step_lib.make_train_step(model.apply, optimizer, config, NUM_CLASSES)
    new_state, _ = jax.jit(step)(state, _batch(size=32), jax.random.key(0))
    before = paths.flatten(params)
    changed = _changed(before, paths.flatten(new_state.params()))
    is_ssf = lambda k: any(part.startswith("ssf_") for part in k.split("/"))
    expected = {k for k in before if k.startswith(head + "/") or (mode == "ssf" and is_ssf(k))}
    assert changed == expected


def test_each_step_draws_new_mixing_from_the_run_key():
    # the run passes one key; the step number is folded in, so step 1 mixes differently from
    # step 0 on the same batch and weights (a run that reused one draw would mix alike)
    _, _, state, step = _setup("ssf", augmentation="strong")
    step = jax.jit(step)
    batch, key = _batch(batch=16), jax.random.key(3)
    losses = [float(step(state.replace(step=jnp.asarray(s, jnp.int32)), batch, key)[1]["loss"])
              for s in range(4)]  # fmt: skip
    assert len(set(losses)) == 4, losses
    # and the same step with the same key repeats exactly (a resumed run redraws it)
    assert float(step(state, batch, key)[1]["loss"]) == losses[0]


def _flat_sharded_setup(ema=0.9):
    """A tiny ssf model (decayed, not-decayed and frozen leaves; frozen BatchNorm statistics):
    the single-device reference step, and the flat sharded state and step on 8 devices."""
    # clip_norm below the gradients' norm (≈ 0.74): the clipping uses the flat step's norm
    model, variables, state, step = _setup("ssf", batch_norm=True, ema_decay=ema, clip_norm=0.5)
    mesh = sharding.data_mesh()
    decay = paths.flatten(masks.weight_decay_mask(variables["params"]))
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    config = _config(ema_decay=ema, clip_norm=0.5)
    flat = flat_sharded.build(state, replicated, config, {k: decay[k] for k in state.trainable},
                              mesh)  # fmt: skip
    flat_step = jax.jit(
        step_lib.make_train_step(model.apply, flat.optimizer, config, NUM_CLASSES,
                                 flat_reduce_mesh=mesh, flat_layout=flat.layout),
        out_shardings=(flat.shardings, NamedSharding(mesh, P())),
    )  # fmt: skip
    flat_state = flat.to_flat(jax.device_put(state, replicated))
    return state, jax.jit(step), flat, flat_state, flat_step, mesh


def test_flat_sharded_step_equals_the_single_device_step():
    """Two steps of the flat sharded state (training.flat_sharded: one all-gather, one
    reduce-scatter) on 8 devices give the single device's parameters, moments and EMA."""
    state, step, flat, flat_state, flat_step, mesh = _flat_sharded_setup()
    key = jax.device_put(jax.random.key(0), NamedSharding(mesh, P()))
    expected_metrics = []
    for seed in (0, 1):
        batch = _batch(seed, batch=16)
        state, metrics = step(state, batch, jax.random.key(0))
        expected_metrics.append(metrics)
        sharded = sharding.shard_local_batch(jax.device_get(batch), mesh)
        if seed == 0:
            flat_step(flat_state, sharded, key)  # compiles (constants move then)
        with jax.transfer_guard("disallow"):  # the step itself moves nothing through the host
            flat_state, got = jax.block_until_ready(flat_step(flat_state, sharded, key))
        for name in ("loss", "grad_norm", "accuracy"):
            np.testing.assert_allclose(float(got[name]), float(metrics[name]), rtol=1e-5)
        assert float(metrics["grad_norm"]) > 0.5  # clipped
    # every vector is split over the 8 devices
    for x in jax.tree.leaves((flat_state.trainable, flat_state.frozen, flat_state.ema)):
        assert x.sharding.spec == P("data") and x.shape[0] % 8 == 0
    got = flat.to_tree(flat_state)
    assert jax.tree.structure(got) == jax.tree.structure(state)
    for want_leaf, got_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip


def test_flat_sharded_step_has_one_all_gather_and_one_reduce_scatter():
    """Across processes on gloo each collective (each buffer of a tuple one) is a round trip: the
    step has one all-gather (parameters), one reduce-scatter (gradients) and one all-reduce of
    one buffer, 3 floats (loss, accuracy, the gradient's sum of squares for its global norm)."""
    _, _, _, flat_state, flat_step, mesh = _flat_sharded_setup()
    batch = sharding.shard_local_batch(jax.device_get(_batch(batch=16)), mesh)
    key = jax.device_put(jax.random.key(0), NamedSharding(mesh, P()))
    hlo = flat_step.lower(flat_state, batch, key).compile().as_text()
    assert hlo.count("all-gather(") == 1
    assert hlo.count("reduce-scatter(") == 1
    (all_reduce,) = [line for line in hlo.splitlines() if " all-reduce(" in line]
    assert " = f32[3]{0} all-reduce(" in all_reduce
    assert "collective-permute(" not in hlo and "all-to-all(" not in hlo


@pytest.mark.parametrize(
    "change",
    [{"label_smoothing": 0.1}, {"augmentation": "strong"}, {"ema_decay": 0.9}, {"bf16": True},
     {"mode": "full"}],
)  # fmt: skip
def test_settings_the_step_compiles_in_are_in_its_compile_key(change):
    # the loop reuses a compiled step for an equal key: a setting read as a Python value by
    # the step but missing from the key would run a sweep's later runs with the first's value
    assert step_lib.compile_key(_config(**change)) != step_lib.compile_key(_config())
    assert step_lib.compile_key(_config(lr=0.3, seed=4, epochs=3)) == step_lib.compile_key(
        _config()
    )
