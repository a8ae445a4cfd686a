"""Fully sharded training state on 8 devices: where every tensor lives, what a device holds, and
that the run is the replicated run to float32 rounding — checkpoints included, either way. The
flat sharded state (`training.flat_sharded`, what multi-process CPU runs use) is forced here
with ``HUBTUNE_FLAT_REDUCE=1``."""

import contextlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import jaxmodels
from jaxmodels import sharding
from jaxmodels.weights.orbax_files import restore_as_numpy
from training import loop, optim
from training.config import TrainConfig

NUM_CLASSES = 8
BATCH = 16
PREP = jaxmodels.Preprocessing(8, 8, (0.5,) * 3, (0.25,) * 3, "bilinear")


class Divisible(nn.Module):
    """Every parameter has ≥ 1024 elements and a dimension divisible by 8: fully shardable."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, images_BHWC, train: bool = False):
        x = nn.Conv(64, (4, 4), strides=(4, 4), use_bias=False, name="conv")(images_BHWC)
        x = nn.relu(x).reshape(x.shape[0], -1)  # [B, 2·2·64]: where the bright row is
        x = nn.relu(nn.Dense(128, use_bias=False, name="hidden")(x))
        return nn.Dense(self.num_classes, use_bias=False, name="head")(x)


def _source(n=64, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    images = rng.integers(0, 120, (n, 8, 8, 3))
    images[np.arange(n), labels, :, labels % 3] += 120  # learnable: a bright row per class
    return jaxmodels.ArraySource(images.astype(np.uint8), labels)


@contextlib.contextmanager
def _flat(on: bool):
    """Forces the flat collectives (`flat_reduce.flat_reduce_pays`) on one process."""
    previous = os.environ.pop("HUBTUNE_FLAT_REDUCE", None)
    if on:
        os.environ["HUBTUNE_FLAT_REDUCE"] = "1"
    try:
        yield
    finally:
        os.environ.pop("HUBTUNE_FLAT_REDUCE", None)
        if previous is not None:
            os.environ["HUBTUNE_FLAT_REDUCE"] = previous


def _fit(tmp, name, *, shard_params, stop_after=None, checkpoint=None, flat=False):
    with _flat(flat):
        return _fit_here(tmp, name, shard_params=shard_params, stop_after=stop_after,
                         checkpoint=checkpoint)  # fmt: skip


def _fit_here(tmp, name, *, shard_params, stop_after=None, checkpoint=None):
    model = Divisible()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    log_path = tmp / f"{name}.jsonl"
    # 4 steps per epoch, one of them warmup, 8 in all
    config = TrainConfig(
        mode="full", epochs=2, batch_size=BATCH, lr=0.003, warmup_epochs=0.25, ema_decay=0.9,
        augmentation="none", checkpoint_every=2, stop_after_steps=stop_after, num_workers=0,
        shard_params=shard_params,
    )  # fmt: skip
    result = loop.fit(
        model, variables, _source(), PREP, config,
        checkpoint_dir=None if checkpoint is None else str(tmp / checkpoint),
        log_path=str(log_path), log_every=1, progress=False, log=lambda _: None,
    )  # fmt: skip
    # (loss, gradient norm) per step: Adam is nearly blind to the gradients' scale, their norm
    # is not (a mean taken as a sum would show there only)
    train = [r for r in map(json.loads, open(log_path)) if r["split"] == "train"]
    return result, np.asarray([(r["loss"], r["grad_norm"]) for r in train])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    replicated, replicated_losses = _fit(tmp, "replicated", shard_params=False)
    sharded, sharded_losses = _fit(tmp, "sharded", shard_params=True)
    # killed after 3 steps (checkpoint at 2), resumed with the other layout
    _fit(tmp, "killed_sharded", shard_params=True, stop_after=3, checkpoint="a")
    to_replicated, _ = _fit(tmp, "resumed_replicated", shard_params=False, checkpoint="a")
    _fit(tmp, "killed_replicated", shard_params=False, stop_after=3, checkpoint="b")
    to_sharded, _ = _fit(tmp, "resumed_sharded", shard_params=True, checkpoint="b")
    # the flat sharded state: a whole run; killed, resumed replicated; killed replicated, resumed
    flat, flat_losses = _fit(tmp, "flat", shard_params=True, flat=True)
    _fit(tmp, "killed_flat", shard_params=True, stop_after=3, checkpoint="c", flat=True)
    flat_to_replicated, _ = _fit(tmp, "flat_resumed_replicated", shard_params=False, checkpoint="c")
    _fit(tmp, "killed_replicated_2", shard_params=False, stop_after=3, checkpoint="d")
    to_flat, _ = _fit(tmp, "resumed_flat", shard_params=True, checkpoint="d", flat=True)
    return {
        "replicated": replicated, "replicated_losses": replicated_losses,
        "sharded": sharded, "sharded_losses": sharded_losses,
        "to_replicated": to_replicated, "to_sharded": to_sharded, "tmp": tmp,
        "flat": flat, "flat_losses": flat_losses, "flat_to_replicated": flat_to_replicated,
        "to_flat": to_flat,
    }  # fmt: skip


def _leaves(state):
    """The params, optimizer state and EMA (not the step counter) as (path, array) pairs."""
    tree = {"trainable": state.trainable, "opt_state": state.opt_state, "ema": state.ema}
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _device0_bytes(x: jax.Array) -> int:
    """Bytes of the shard device 0 holds, read from the array itself."""
    (shard,) = [s for s in x.addressable_shards if s.device == jax.devices()[0]]
    return shard.data.nbytes


def test_each_device_holds_an_eighth_of_the_parameters_and_optimizer_state(runs):
    state = runs["sharded"].state
    total = held = 0
    big = 0
    for path, x in _leaves(state):
        total += x.nbytes
        held += _device0_bytes(x)
        if x.size >= sharding.MIN_SHARDED_SIZE:  # every weight, Adam moment and EMA copy
            big += 1
            largest = int(np.argmax(x.shape))
            expected = [None] * x.ndim
            expected[largest] = sharding.DATA_AXIS
            assert x.sharding.spec == PartitionSpec(*expected), path
            assert len({s.device for s in x.addressable_shards}) == 8
            shard_shape = list(x.shape)
            shard_shape[largest] //= 8
            assert all(list(s.data.shape) == shard_shape for s in x.addressable_shards), path
        else:  # Adam's step counts: scalars, replicated
            assert x.sharding.is_fully_replicated and x.ndim == 0, path
    assert big == 3 * 4  # conv, hidden, head: weights, mu, nu, EMA
    scalars = sum(x.nbytes for _, x in _leaves(state) if x.ndim == 0)
    assert held == (total - scalars) // 8 + scalars
    assert held < total / 7.9
    assert sharding.bytes_per_device([x for _, x in _leaves(state)]) == held
    # the replicated default: every device holds everything
    replicated = runs["replicated"].state
    assert all(x.sharding.is_fully_replicated for _, x in _leaves(replicated))
    assert sum(_device0_bytes(x) for _, x in _leaves(replicated)) == total


@pytest.mark.parametrize("layout", ["sharded", "flat"])
def test_the_sharded_run_is_the_replicated_run_to_float32_rounding(runs, layout):
    replicated, sharded = runs["replicated_losses"], runs[f"{layout}_losses"]
    assert len(replicated) == len(sharded) == 8
    assert replicated[-1, 0] < 0.8 * replicated[0, 0]  # it learns
    # gradients are reduce-scattered instead of all-reduced: the 8 devices' sums add up in
    # another order, so losses agree to float32 rounding, not bit for bit
    np.testing.assert_allclose(sharded, replicated, rtol=1e-5)
    got = sharding.host_copy(runs[layout].state.trainable)
    want = sharding.host_copy(runs["replicated"].state.trainable)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    ("resumed", "layout"),
    [("to_replicated", False), ("to_sharded", True), ("flat_to_replicated", False),
     ("to_flat", True)],
)  # fmt: skip
def test_a_checkpoint_restores_into_the_other_layout(runs, resumed, layout):
    result = runs[resumed]
    assert result.finished and result.resumed_from == 2
    for path, x in _leaves(result.state):
        sharded_here = not x.sharding.is_fully_replicated
        assert sharded_here == (layout and x.size >= sharding.MIN_SHARDED_SIZE), path
    got = sharding.host_copy(result.state.trainable)
    want = sharding.host_copy(runs["replicated"].state.trainable)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_the_fsdp_rule_picks_the_largest_divisible_dimension():
    spec = lambda shape, min_size=1024: sharding.fsdp_spec(shape, 8, min_size)
    assert spec((768, 3072)) == PartitionSpec(None, "data")
    assert spec((16, 16, 3, 768)) == PartitionSpec(None, None, None, "data")
    assert spec((1, 197, 768)) == PartitionSpec(None, None, "data")  # 197 does not divide
    assert spec((768, 12, 64)) == PartitionSpec("data", None, None)
    assert spec((64, 64)) == PartitionSpec("data", None)  # equal sizes: the first
    assert spec((1001, 7)) == PartitionSpec()  # nothing divides: replicated
    assert spec((768,)) == PartitionSpec()  # small: replicated
    assert spec((768,), min_size=1) == PartitionSpec("data")
    assert spec(()) == PartitionSpec()
    assert sharding.fsdp_spec((768, 3072), 1) == PartitionSpec()  # one device


def test_param_shardings_follow_shapes_for_arrays_and_abstract_trees():
    mesh = sharding.data_mesh()
    tree = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32), "b": np.zeros(32, np.float32)}
    sharded = sharding.param_shardings(tree, mesh)
    assert sharded["w"].spec == PartitionSpec("data", None)
    assert sharded["b"].spec == PartitionSpec()
    replicated = sharding.param_shardings(tree, mesh, shard=False)
    assert all(s.spec == PartitionSpec() for s in replicated.values())
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharded[k]) for k, v in tree.items()
    }
    assert sharding.bytes_per_device(abstract) == 64 * 32 * 4 // 8 + 32 * 4
    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    placed = sharding.put({"w": w}, {"w": sharded["w"]})
    assert placed["w"].addressable_shards[0].data.shape == (8, 32)
    np.testing.assert_array_equal(sharding.host_copy(placed)["w"], w)
    with pytest.raises(ValueError, match="mesh must have an axis named 'data'"):
        sharding.param_shardings(tree, jax.sharding.Mesh(np.asarray(jax.devices()), ("model",)))


def test_a_sharded_runs_checkpoint_reads_back_whole_as_numpy(runs):
    """What `jaxmodels.load` and `run_folder.trained_variables` read: the final checkpoint of the
    run resumed sharded (written shard by shard) holds the whole arrays the state holds."""
    state = runs["to_sharded"].state
    saved = restore_as_numpy(runs["tmp"] / "b" / "8" / "state")
    assert int(saved["step"]) == 8
    want = sharding.host_copy(state.trainable)
    assert set(saved["trainable"]) == set(want)
    for key, value in want.items():
        assert isinstance(saved["trainable"][key], np.ndarray)
        np.testing.assert_array_equal(saved["trainable"][key], value, err_msg=key)


def test_the_flat_sharded_state_holds_an_eighth_per_device():
    """Parameters, Adam moments and EMA as flat vectors split over 8 devices: each device holds
    1/8 of every vector (padded to a multiple of 8) and the replicated Adam step counts."""
    from training.programs import run_programs

    model = Divisible()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    mesh = sharding.data_mesh()
    config = TrainConfig(mode="full", epochs=2, ema_decay=0.99, shard_params=True)
    # flat=True: the flat state a multi-process CPU run would choose, here in one process
    programs = run_programs(model, variables, config, num_classes=NUM_CLASSES, preprocessing=PREP,
                            mesh=mesh, flat=True)  # fmt: skip
    state = programs.initial_state(variables, optim.schedule_state(config, 4))
    flat_state = programs.to_flat(state)
    held = lambda s: [s.trainable, s.opt_state, s.ema]
    vectors = [x for x in jax.tree.leaves(held(flat_state)) if x.ndim]
    scalars = [x for x in jax.tree.leaves(held(flat_state)) if not x.ndim]
    assert len(vectors) == 4  # one group (every Divisible weight decays): weights, mu, nu, EMA
    for x in vectors:
        assert x.sharding.spec == PartitionSpec("data")
        assert {s.data.shape for s in x.addressable_shards} == {(x.shape[0] // 8,)}
    assert all(x.sharding.is_fully_replicated for x in scalars)
    whole = sum(x.nbytes for x in jax.tree.leaves(held(state)))  # global arrays: every byte
    per_device = sharding.bytes_per_device(held(flat_state))
    assert per_device == sum(x.nbytes // 8 for x in vectors) + sum(x.nbytes for x in scalars)
    assert per_device < whole / 7.9
    # and back: the pytree layout, as checkpoints keep it
    back = programs.to_tree(flat_state)
    for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        assert got.sharding == want.sharding
        np.testing.assert_array_equal(sharding.host_copy(got), sharding.host_copy(want))
