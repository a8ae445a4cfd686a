"""Per-device statistics (TSQR): one R factor per device, merged once, equal one device's.

`jaxmodels.stream_reduce(..., merge=)` keeps a carry per device, each folding only its own rows of
each batch; `scoring.tsqr` merges the devices' `ScoreStats` and factors row-sharded in-memory
features device by device. On the 8 fake CPU devices with 203 rows in batches of 32 (4 rows per
device), the last batch holds 11 rows: devices 0-1 get 4 of them, device 2 three, the rest only
padding, so the devices see 28, 28, 27 and 24 rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from test_stats import C, D, K, LinearFeatures, N, make_data, softmax

import jaxmodels
from jaxmodels import sharding
from jaxmodels.inference import features as features_lib
from scoring import stats as stats_lib
from scoring import tsqr

BATCH = 32
ROWS = BATCH // 8  # per device
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


@pytest.fixture(scope="module")
def model_and_data():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(N, 4, 4, 3)).astype(np.float32) + np.float32(1)
    labels = rng.integers(0, C, N)
    model = LinearFeatures()
    return model, model.init(jax.random.key(0), images[:1]), images, labels


def _update(head):
    """`stats.buffered_update` with the head's source probabilities (NCE's and LEEP's joints)."""

    def update(buf, feats_BD, labels_B, valid_B):
        probs_BK = jax.nn.softmax(feats_BD @ head["kernel"] + head["bias"][None, :])
        return stats_lib.buffered_update(buf, feats_BD, labels_B, valid_B, probs_BK)

    return update


def _init(dtype, rows=ROWS):
    """A buffer of ≥ P rows, whole batches of `rows` (one device's, or the global batch)."""
    stats = stats_lib.init(D, C, num_source_classes=K, dtype=dtype)
    return stats_lib.buffered(stats, -(-stats.r_factor.shape[0] // rows) * rows)


def test_per_device_stream_equals_one_device_in_float64(model_and_data):
    model, variables, images, labels = model_and_data
    merges = []

    def merge(bufs_M):
        merges.append(bufs_M.stats.r_factor.shape)  # traced (and run) once per stream
        return tsqr.merge_buffered(bufs_M)

    with jax.enable_x64(True):
        got = jaxmodels.stream_reduce(
            model,
            variables,
            images,
            labels=labels,
            init=_init(jnp.float64),
            update=_update(variables["params"]["head"]),
            merge=merge,
            batch_size=BATCH,
            progress=False,
        )
        assert merges == [(8, 1 + D + C, 1 + D + C)]
        feats, logits = jaxmodels.extract_features(
            model, variables, images, batch_size=BATCH, return_logits=True, progress=False
        )
        # one device, every row in one QR: the statistics a replicated stream would hold
        cpu = jax.devices()[0]
        f64, probs = feats.astype(np.float64), softmax(logits.astype(np.float64))
        want = jax.device_put(
            stats_lib.update(
                stats_lib.init(D, C, num_source_classes=K, dtype=jnp.float64),
                *jax.device_put((f64, labels, np.ones(N, bool), probs), cpu),
            ),
            cpu,
        )
        got = sharding.host_copy(got)
        assert float(got.num_samples) == N
        np.testing.assert_array_equal(got.class_count_C, want.class_count_C)
        np.testing.assert_array_equal(got.source_argmax_joint_CK, want.source_argmax_joint_CK)
        np.testing.assert_allclose(got.source_joint_CK, want.source_joint_CK, rtol=1e-6)  # f32 θ
        for field in ("score", "evidence", "alpha", "beta"):
            np.testing.assert_allclose(
                getattr(stats_lib.logme_from_stats(got), field),
                getattr(stats_lib.logme_from_stats(want), field),
                rtol=1e-9,
                err_msg=field,
            )
        np.testing.assert_allclose(
            float(stats_lib.hscore_from_stats(got)),
            float(stats_lib.hscore_from_stats(want)),
            rtol=1e-9,
        )


def _step_and_args(model, variables, labels, images, per_device):
    """The stream's jitted step and one batch's arguments, all uploaded explicitly."""
    mesh = sharding.data_mesh()
    carry = sharding.replicate(_init(jnp.float32, ROWS if per_device else BATCH), mesh)
    if per_device:
        carry = features_lib._per_device(carry, mesh)
    update = _update(variables["params"]["head"])
    step = features_lib._stream_step(model, None, None, mesh, update, per_device)
    batch = {
        "images": images[:BATCH],
        "labels": labels[:BATCH].astype(np.int32),
        "valid": np.ones(BATCH, bool),
    }
    batch = sharding.shard_local_batch(batch, mesh)
    args = (carry, sharding.replicate(variables, mesh), *batch.values())
    return step, args


def test_the_per_device_step_communicates_nothing_and_runs_without_transfers(model_and_data):
    model, variables, images, labels = model_and_data
    texts = {}
    for per_device in (False, True):
        step, args = _step_and_args(model, variables, labels, images, per_device)
        texts[per_device] = step.lower(*args).compile().as_text()
    # the replicated carry gathers the batch every step: what the per-device one must not do
    assert any(c in texts[False] for c in COLLECTIVES)
    assert [c for c in COLLECTIVES if c in texts[True]] == []
    with jax.transfer_guard("disallow"):
        carry = step(*args)
        carry = step(carry, *args[1:])
    assert carry.stats.r_factor.shape == (8, 1 + D + C, 1 + D + C)
    assert carry.stats.r_factor.sharding.spec == PartitionSpec("data")
    np.testing.assert_array_equal(carry.filled, np.full(8, 2 * ROWS))
    # the merge flushes each device's buffer where it is: only the 8 factors [8·P, P] travel
    mesh, size = sharding.data_mesh(), 1 + D + C
    merge = jax.jit(tsqr.merge_buffered, out_shardings=sharding.replicated_sharding(mesh))
    text = merge.lower(carry).compile().as_text()
    gathers = [line.split("=")[1].split()[0] for line in text.splitlines() if "all-gather(" in line]
    assert gathers == [f"f32[{8 * size},{size}]{{1,0}}"]


def test_row_sharded_features_factor_per_device_and_equal_one_qr():
    feats, labels, _ = make_data()
    # 256 rows, 32 a device: devices 0-5 hold 32 valid rows, device 6 eleven, device 7 none
    valid = np.arange(256) < N
    padded = np.zeros((256, D))
    padded[:N] = feats
    padded_labels = np.zeros(256, np.int64)
    padded_labels[:N] = labels
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    with jax.enable_x64(True):
        rows = jax.device_put((padded, padded_labels, valid), sharding.batch_sharding(mesh))
        with jax.transfer_guard("disallow"):
            got = tsqr.from_sharded_rows(
                *rows[:2], C, valid_N=rows[2], mesh=mesh, dtype=jnp.float64
            )
        assert got.r_factor.sharding.is_fully_replicated
        from_host = tsqr.from_sharded_rows(feats, labels, C, mesh=mesh, dtype=jnp.float64)
        cpu = jax.devices()[0]
        want = stats_lib.update(
            stats_lib.init(D, C, dtype=jnp.float64), *jax.device_put((feats, labels), cpu)
        )
        for stats in (got, from_host):
            assert float(stats.num_samples) == N
            np.testing.assert_array_equal(stats.class_count_C, want.class_count_C)
            np.testing.assert_allclose(
                float(stats_lib.logme_from_stats(stats).score),
                float(stats_lib.logme_from_stats(want).score),
                rtol=1e-9,
            )
            np.testing.assert_allclose(
                float(stats_lib.hscore_from_stats(stats)),
                float(stats_lib.hscore_from_stats(want)),
                rtol=1e-9,
            )
        # the rows stay where they are: only the 8 factors [8, P, P] (and the counts) move
        text = tsqr._factor_rows.lower(
            *rows, num_classes=C, mesh=mesh, dtype=jnp.float64
        ).compile().as_text()  # fmt: skip
        moved = [line for line in text.splitlines() if any(f"{c}(" in line for c in COLLECTIVES)]
        assert moved and all(f"[256,{D}]" not in line and "[256]" not in line for line in moved)


def test_merges_need_a_device_axis(model_and_data):
    model, variables, images, labels = model_and_data
    with pytest.raises(TypeError, match="merge must be callable or None"):
        jaxmodels.stream_reduce(
            model, variables, images, labels=labels, init=_init(jnp.float32), update=_update({}),
            merge="tsqr",
        )  # fmt: skip
    stats = stats_lib.init(D, C)
    with pytest.raises(ValueError, match=r"\[M, P, P\]"):
        tsqr.merge_stacked(stats)
    with pytest.raises(ValueError, match="leading device axis"):
        tsqr.merge_buffered(stats_lib.buffered(stats, 4))
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        tsqr.from_sharded_rows(jnp.zeros((9, D)), jnp.zeros(9, int), C)
