"""Tests for training.optim: schedule, AdamW update and that frozen leaves carry no state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_classifier import init_tiny

from jaxmodels.models import paths
from training import masks, optim
from training.config import TrainConfig


def _state_param_keys(opt_state) -> set[str]:
    """Every parameter path that appears under any dict in the optimizer state."""
    keys = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys.update(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    return keys


@pytest.mark.parametrize("mode", ["linear", "bitfit", "ssf", "full"])
def test_optimizer_state_has_entries_for_trainable_leaves_only(mode):
    _, variables = init_tiny(ssf=True, batch_norm=True)
    params = variables["params"]
    mask = masks.trainable_mask(params, mode)
    trainable, frozen = masks.split_params(params, mask)
    decay = paths.flatten(masks.weight_decay_mask(params))
    _, opt_state = optim.init_optimizer(TrainConfig(), trainable, decay)
    # the learning rate lives in the state too (set each step from the schedule)
    assert _state_param_keys(opt_state) == set(trainable) | {"learning_rate"}
    assert not _state_param_keys(opt_state) & set(frozen)
    # Adam's two moments, one per trainable scalar, plus scalar counts
    moment_scalars = 2 * masks.count_params(trainable)
    count_scalars = sum(x.size for x in jax.tree.leaves(opt_state)) - moment_scalars
    assert 0 < count_scalars <= 5


def test_schedule_is_linear_warmup_then_cosine():
    # 4 epochs of 5 steps, one of them warmup: 5 warmup steps, 20 in all
    schedule = optim.make_schedule(TrainConfig(lr=0.1, epochs=4, warmup_epochs=1), 5)
    for t in range(21):
        if t < 5:
            expected = 0.1 * t / 5
        else:
            expected = 0.1 * 0.5 * (1 + np.cos(np.pi * (t - 5) / 15))
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-6, atol=1e-9)


def test_schedule_of_warmup_only_ramps_to_the_peak():
    # warmup longer than the run: it ends at the run's last step
    schedule = optim.make_schedule(TrainConfig(lr=0.2, epochs=1, warmup_epochs=3), 4)
    np.testing.assert_allclose(
        [float(schedule(t)) for t in range(5)], [0, 0.05, 0.1, 0.15, 0.2], rtol=1e-6
    )


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_adamw_step_matches_numpy(jit):
    rng = np.random.default_rng(0)
    params = {"a/kernel": rng.normal(size=(3, 2)), "a/bias": rng.normal(size=(2,))}
    grads = {k: rng.normal(size=v.shape) * 3 for k, v in params.items()}
    lr, wd, clip, b1, b2, eps = 0.1, 0.5, 1.0, 0.9, 0.999, 1e-8
    config = TrainConfig(lr=lr, warmup_epochs=0, weight_decay=wd, clip_norm=clip)
    decay = {"a/kernel": True, "a/bias": False}
    opt, state = optim.init_optimizer(config, jax.tree.map(jnp.asarray, params), decay)
    update = jax.jit(opt.update) if jit else opt.update
    updates, _ = update(jax.tree.map(jnp.asarray, grads), state, jax.tree.map(jnp.asarray, params))

    # NumPy AdamW (Loshchilov & Hutter, Alg. 2) at step 1 after global-norm clipping.
    norm = np.sqrt(sum((g**2).sum() for g in grads.values()))
    scale = min(1.0, clip / norm)
    for k, p in params.items():
        g = grads[k] * scale
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g**2 / (1 - b2)
        step = m_hat / (np.sqrt(v_hat) + eps) + (wd * p if decay[k] else 0)
        np.testing.assert_allclose(np.asarray(updates[k]), -lr * step, rtol=2e-5, atol=1e-7)


def test_init_optimizer_needs_a_decay_entry_per_trainable_leaf():
    with pytest.raises(ValueError, match=r"decay_mask has no entry .*'b'"):
        optim.init_optimizer(TrainConfig(), {"b": jnp.zeros(2)}, {"a": True})


def test_a_schedule_needs_a_step_per_epoch():
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1"):
        optim.schedule_state(TrainConfig(), 0)


def test_tree_bytes_counts_array_bytes():
    assert (
        optim.tree_bytes({"a": jnp.zeros((2, 3), jnp.float32), "b": jnp.zeros(4, jnp.bfloat16)})
        == 32
    )


def test_a_sweep_shares_one_compiled_step():
    # rates and lengths are data in the state, so two configs trace to the same program
    from tiny_classifier import init_tiny

    from training import step as step_lib

    model, variables = init_tiny(num_classes=3)
    mask = masks.trainable_mask(variables["params"], "full")
    trainable, _ = masks.split_params(variables["params"], mask)
    decay = paths.flatten(masks.weight_decay_mask(variables["params"]))
    texts = []
    for lr, epochs, seed in ((0.1, 2, 0), (0.003, 7, 5)):
        config = TrainConfig(mode="full", lr=lr, epochs=epochs, warmup_epochs=0.4, seed=seed)
        assert step_lib.compile_key(config) == step_lib.compile_key(TrainConfig(mode="full"))
        optimizer, _ = optim.init_optimizer(config, trainable, decay)
        state = step_lib.init_train_state(variables, mask, optimizer,
                                          schedule=optim.schedule_state(config, 5))  # fmt: skip
        step = step_lib.make_train_step(model.apply, optimizer, config, 3)
        batch = {"image": jnp.zeros((4, 8, 8, 3)), "label": jnp.zeros(4, jnp.int32)}
        texts.append(jax.jit(step).lower(state, batch, jax.random.key(0)).as_text())
        _, metrics = jax.jit(step)(state.replace(step=jnp.asarray(3)), batch, jax.random.key(0))
        assert float(metrics["lr"]) == pytest.approx(float(optim.make_schedule(config, 5)(3)))
    assert texts[0] == texts[1]
