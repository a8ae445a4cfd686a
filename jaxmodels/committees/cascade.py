"""The adaptive cascade executor: each example stops at the first stage confident enough.

`Cascade` runs on the devices (Wang et al., ICLR 2022). The images are uploaded once, split over
the mesh's 'data' axis (`jaxmodels.inference.row_batches.DeviceRows`); stage 0 runs on every
example; each device compacts the local indices of its rows that did not exit, and the next
stage gathers those rows where they are, in calls of a few bucket sizes, each compiled once
(ahead of the run with `Cascade.warmup`). Answers are scattered in place and fetched once, at
the end; between stages only each device's count of undecided rows (and a non-finite flag)
reaches the host, to pick the next calls' buckets. Decisions follow
`jaxmodels.committees.rules`, as `simulate_cascade` does.

Shapes: M members, N images, S devices on 'data', n = ⌈N/S⌉ rows per device held in blocks of
C (`DeviceRows.capacity`), b rows of one call per device, K classes.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from jaxmodels import jit_cache, sharding
from jaxmodels.committees import members as members_lib
from jaxmodels.committees import rules as cascade_rules
from jaxmodels.committees.rules import CascadeOutput
from jaxmodels.inference import row_batches


class Cascade:
    """An adaptive cascade: each example stops at the first stage confident enough.

    Stage k predicts with the mean of members 0..k's logits (``rule="ensemble"``, the paper's)
    or member k alone (``"single"``); an example exits at stage k < M − 1 when the confidence of
    that prediction's softmax is > ``thresholds[k]``; the last stage answers the rest (see
    `jaxmodels.committees.rules`). Only the examples still undecided run the next member.

    Args:
      members: the `Member`s, cheapest first: their ``flops`` must be non-decreasing (they are
        not reordered, since thresholds belong to stage positions; a cost inversion raises).
      thresholds: [M − 1] exit thresholds (in [0, 1] for ``max_prob`` and ``margin``).
      confidence: ``"max_prob"``, ``"margin"``, ``"neg_entropy"`` or a jittable callable
        probs_BC -> conf_B.
      rule: ``"ensemble"`` or ``"single"``.
      mesh: a `Mesh` with a 'data' axis; default all devices.
      batch_size: rows of the largest device step; stage 0 runs in batches of this size.
        Default 256 rounded up to a multiple of the 'data' size.
      buckets: the padded sizes a stage's leftover examples may take (each a multiple of the
        'data' size, none above batch_size); default `row_batches.default_buckets`: on a CPU
        steps of batch_size/16 and powers of two below, on accelerators powers of two. Each
        (stage, bucket) compiles once (`warmup` compiles them all ahead).

    Raises:
      TypeError / ValueError: bad members (empty, flops decreasing), thresholds, confidence,
        rule, mesh, batch size or buckets.
    """

    def __init__(
        self,
        members,
        thresholds,
        *,
        confidence="max_prob",
        rule="ensemble",
        mesh=None,
        batch_size=None,
        buckets=None,
    ):
        self.members = members_lib.check_members(members)
        flops_M = np.array([m.flops for m in self.members], dtype=np.float64)
        if (np.diff(flops_M) < 0).any():
            raise ValueError(
                "members must be ordered by cost (flops non-decreasing); got "
                + ", ".join(f"{m.name or i}: {m.flops:.4g}" for i, m in enumerate(self.members))
            )
        self.flops = flops_M
        self.thresholds = cascade_rules.check_thresholds(thresholds, len(self.members), confidence)
        self.confidence = confidence
        self._confidence_fn = cascade_rules.resolve_confidence(confidence)
        self.rule = cascade_rules.check_rule(rule)
        self.mesh, self.buckets = row_batches.mesh_and_buckets(mesh, batch_size, buckets)
        self.batch_size = self.buckets[-1]
        self._variables = [sharding.replicate(m.variables, self.mesh) for m in self.members]
        self._call_memo: dict = {}  # this cascade's executables by stage, size and shapes
        self._next_stage = jit_cache.cached(
            ("cascade-next-stage", self.mesh),
            lambda: jax.jit(_next_stage, out_shardings=sharding.batch_sharding(self.mesh)),
        )
        # float32 on the devices, deciding exactly as the float64 thresholds do in simulation
        self._thresholds32 = [
            sharding.replicate(np.float32(t), self.mesh)
            for t in [*cascade_rules.float32_thresholds(self.thresholds), np.float32(np.inf)]
        ]

    @property
    def full_flops(self) -> float:
        """Cost of an example that runs every stage: Σ flops."""
        return float(self.flops.sum())

    def _stage_step(self, stage: int):
        """Stage `stage`'s model call: (variables, images_B, sum_prev_BK) -> (combined_BK,
        sum_BK, conf_B), data-parallel over the batch; compiled once per bucket, whatever N."""
        member, rule, confidence_fn = self.members[stage], self.rule, self._confidence_fn
        apply_fn, preprocessing = member.apply_fn, member.preprocessing
        reads_sum = rule == "ensemble" and stage > 0

        def step(variables, images_BX, sum_prev_BK):
            logits_BK = members_lib.forward(apply_fn, preprocessing, variables, images_BX)
            sum_BK, combined_BK = cascade_rules.stage_combine(
                sum_prev_BK if reads_sum else None, logits_BK, stage=stage, rule=rule
            )
            return combined_BK, sum_BK, cascade_rules.stage_confidence(combined_BK, confidence_fn)

        key = ("stage", apply_fn, preprocessing, stage, rule, confidence_fn, self.mesh)
        return key, lambda: row_batches.data_parallel(step, self.mesh)

    def _calls(self, rows, state, stage: int, size: int, images):
        """The three executables of one call of `size` rows per device at stage `stage`:
        take (gather the undecided rows and their sums on their device), the stage's model
        step, record (answers, exits, sums and the next pending list, in place)."""
        # every shape of the state follows from the block and the pending list's room
        key = (stage, size, rows.capacity, state.pending.shape, images.shape, images.dtype.name)
        if key not in self._call_memo:
            self._call_memo[key] = self._compile_calls(rows, state, stage, size, images)
        return self._call_memo[key]

    def _compile_calls(self, rows, state, stage: int, size: int, images):
        spec, replicated = PartitionSpec(sharding.DATA_AXIS), PartitionSpec()
        last = stage == len(self.members) - 1
        keeps_sum = self.rule == "ensemble" and not last

        def take(images_CX, state: _CascadeState, start):
            valid_b = start + jnp.arange(size) < state.count[0]
            idx_b = jnp.where(valid_b, lax.dynamic_slice_in_dim(state.pending, start, size), 0)
            return idx_b, valid_b, images_CX[idx_b], state.sums[idx_b]

        def record(state: _CascadeState, idx_b, valid_b, combined_bK, sum_bK, conf_b, threshold, k):
            capacity = state.answer.shape[0]  # drop index of rows' scatters (out of range)
            room = state.pending.shape[0]  # drop index of the pending list's scatter
            bad = state.bad | jnp.any(valid_b & ~jnp.isfinite(conf_b))
            leaves_b = valid_b if last else valid_b & (conf_b > threshold)
            stays_b = valid_b & ~leaves_b
            exits_b = jnp.where(leaves_b, idx_b, capacity)
            answer = state.answer.at[exits_b].set(combined_bK, mode="drop")
            exit_stage = state.exit_stage.at[exits_b].set(k, mode="drop")
            sums = state.sums
            if keeps_sum:
                sums = sums.at[jnp.where(stays_b, idx_b, capacity)].set(sum_bK, mode="drop")
            slot_b = state.next_count[0] + jnp.cumsum(stays_b) - 1
            next_pending = state.next_pending.at[jnp.where(stays_b, slot_b, room)].set(
                idx_b, mode="drop"
            )
            next_count = state.next_count + jnp.sum(stays_b, dtype=jnp.int32)
            return _CascadeState(
                state.pending, state.count, sums, answer, exit_stage, next_pending, next_count, bad
            )

        zero = rows.scalar(0)
        take_call = row_batches.compiled(
            ("cascade-take", size, self.mesh),
            lambda: row_batches.per_device(take, self.mesh, (spec, spec, replicated), spec),
            images, state, zero,
        )  # fmt: skip
        idx_b, valid_b, images_b, sums_b = row_batches.abstract(take_call.out_info)
        key, build = self._stage_step(stage)
        step_call = row_batches.compiled(key, build, self._variables[stage], images_b, sums_b)
        record_specs = (spec, spec, spec, spec, spec, spec, replicated, replicated)
        record_call = row_batches.compiled(
            ("cascade-record", size, last, keeps_sum, self.mesh),
            lambda: row_batches.per_device(record, self.mesh, record_specs, spec, donate_argnums=0),
            state, idx_b, valid_b, *row_batches.abstract(step_call.out_info),
            self._thresholds32[stage], zero,
        )  # fmt: skip
        return take_call, step_call, record_call

    def _start(self, images) -> tuple[row_batches.DeviceRows, _CascadeState]:
        """The images uploaded once, and the state of a run before stage 0: every row pending."""
        inputs = members_lib.member_inputs(images, self.members)
        rows = row_batches.DeviceRows(inputs, self.mesh, self.buckets)
        num_classes = self._num_classes(rows)
        # The pending lists have room for one padded call past the last row.
        room = rows.capacity + rows.local_buckets[-1]
        counts = rows.per_device(rows.counts_S)
        state = _CascadeState(
            pending=rows.local_indices(room),
            count=counts,
            sums=rows.zeros((num_classes,), jnp.float32),
            answer=rows.zeros((num_classes,), jnp.float32),
            exit_stage=rows.zeros((), jnp.int32),
            next_pending=rows.zeros((), jnp.int32, rows_per_device=room),
            next_count=rows.per_device(np.zeros_like(rows.counts_S)),
            bad=rows.per_device(np.zeros(rows.shards, bool)),
        )
        return rows, state

    def _num_classes(self, rows: row_batches.DeviceRows) -> int:
        """K, from stage 0's output shape (traced once per model and image shape)."""
        member, x = self.members[0], rows.arrays[0]
        one = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
        forward = lambda v, x: members_lib.forward(member.apply_fn, member.preprocessing, v, x)
        key = ("cascade-classes", member.apply_fn, member.preprocessing, one.shape, one.dtype.name)
        return jit_cache.cached(
            key, lambda: int(jax.eval_shape(forward, self._variables[0], one).shape[-1])
        )

    def warmup(self, images) -> int:
        """Compiles every (stage, bucket) executable a run over `images` may call, ahead of it.

        Returns:
          How many (stage, bucket) executables a run may call (each compiled once per shapes).
        """
        rows, state = self._start(images)
        chunks = row_batches.bucket_chunks(rows.rows_per_device, rows.local_buckets)
        first = sorted({size for *_, size in chunks})
        count = 0
        for stage in range(len(self.members)):
            for size in first if stage == 0 else rows.local_buckets:
                self._calls(rows, state, stage, size, rows.arrays[stage])
                count += 1
        return count

    def run(self, images) -> CascadeOutput:
        """Runs the cascade adaptively over `images`.

        The images are uploaded once; each stage runs on the rows still undecided, gathered on
        their own device, and the answers stay on the devices until the end. Between stages
        only each device's count of undecided rows (and a non-finite flag) reaches the host, to
        pick the next calls' buckets. All the images live on the devices during the run (each
        device's rows padded to one largest batch, or beyond it to at most twice their number;
        `DeviceRows`): run a set larger than the devices' memory in parts.

        Args:
          images: an array [N, H, W, 3] for all members or a sequence of one per member
            (uint8: normalised on the device with each member's preprocessing; float: as
            given).

        Returns:
          A `CascadeOutput` (predictions, exit stages, answering logits, average and worst
          FLOPs of this run, wall-clock seconds, exit fractions).

        Raises:
          TypeError / ValueError: malformed images; a member producing NaN/inf logits.
        """
        start_time = time.perf_counter()
        rows, state = self._start(images)
        counts_S = rows.counts_S
        for stage in range(len(self.members)):
            variables, threshold = self._variables[stage], self._thresholds32[stage]
            images, k = rows.arrays[stage], rows.scalar(stage)
            for start, _, size in row_batches.bucket_chunks(counts_S.max(), rows.local_buckets):
                take, step, record = self._calls(rows, state, stage, size, images)
                idx_b, valid_b, images_b, sums_b = take(images, state, rows.scalar(start))
                outs = step(variables, images_b, sums_b)
                state = record(state, idx_b, valid_b, *outs, threshold, k)
            counts_S, bad_S = sharding.host_copy((state.next_count, state.bad))
            if bad_S.any():
                name = self.members[stage].name or f"member {stage}"
                raise ValueError(f"stage {stage} ({name}) produced non-finite logits or confidence")
            if not counts_S.any():
                break
            state = self._next_stage(state)
        exit_N, answer_NK = rows.fetch(state.exit_stage, state.answer)
        wall_seconds = time.perf_counter() - start_time
        return cascade_rules.cascade_output(exit_N, answer_NK, self.flops, wall_seconds)


class _CascadeState(NamedTuple):
    """A cascade run on the devices, every leaf split over 'data': per device C rows (``sums``,
    ``answer``, ``exit_stage``), C + b_max list entries (``pending``, ``next_pending``: room
    for one padded call) or one entry (``count``, ``next_count``, ``bad``).

    pending: local indices of the rows the current stage runs, the first ``count`` valid.
    sums: running logit sums of undecided rows, at their own index (rule "ensemble").
    answer, exit_stage: each decided row's answer logits and stage, at its own index.
    next_pending, next_count: the rows that stay undecided, for the next stage.
    bad: whether a valid row had a non-finite confidence.
    """

    pending: jax.Array
    count: jax.Array
    sums: jax.Array
    answer: jax.Array
    exit_stage: jax.Array
    next_pending: jax.Array
    next_count: jax.Array
    bad: jax.Array


def _next_stage(state: _CascadeState) -> _CascadeState:
    """The rows that stayed become the pending rows; the next list starts empty."""
    return state._replace(
        pending=state.next_pending,
        count=state.next_count,
        next_pending=state.pending,
        next_count=jnp.zeros_like(state.next_count),
    )
