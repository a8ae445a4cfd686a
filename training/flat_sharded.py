"""Fully sharded training with a flat state: one all-gather and one reduce-scatter per step.

With ``shard_params`` XLA all-gathers every parameter and reduce-scatters every gradient leaf by
leaf. On the CPU backend across processes each of those is its own gloo exchange (every device a
gloo rank), like the per-leaf all-reduces that `training.flat_reduce` replaces for replicated
training; `training.loop.fit` uses this module where `flat_reduce.flat_reduce_pays`. Here the train
state itself is flat: the trainable parameters are two vectors, ``decayed`` and ``not_decayed``
(so AdamW's weight-decay mask is a 2-leaf pytree and optax runs unchanged), the frozen ones a
third, each padded to a multiple of the device count and split over 'data' (each device holds
1/n); the Adam moments and the EMA are vectors of the same shapes and shardings. One step:

1. inside `jax.shard_map`, the local slices of all vectors are concatenated and gathered by ONE
   `lax.all_gather` into ``[n, L]`` rows, whose column blocks are the whole vectors;
2. they are unraveled into ``{path: array}`` and each device differentiates its slice of the
   batch. The gathered parameters are device-invariant; as in `flat_reduce` they are marked
   varying first (`jax.lax.pcast(..., to="varying")`), else differentiating them would sum the
   gradients over the devices and the reduce-scatter would sum them again;
3. the gradients are raveled into the same ``[n, L]`` row layout and ONE
   `lax.psum_scatter(..., scatter_dimension=0, tiled=True)` leaves each device the sum of its
   own slice; divided by n, that is the global mean gradient's slice;
4. the loss, the accuracy and the local sum of squares of the gradient's slice are summed in ONE
   all-reduce of 3 floats (on gloo every collective, however small, is a round trip between the
   processes): the global gradient norm, which the clipping reuses
   (`optim.clip_by_global_norm`'s ``grad_norm``);
5. outside `shard_map` the optimizer (clipping + AdamW) and the EMA run on the sharded vectors,
   elementwise on each device's slice.

Checkpoints keep the per-leaf pytree layout (`FlatSharded.to_tree` before a save, `to_flat`
after a restore: rare), so a run resumes replicated, per-leaf sharded or flat, whatever wrote it.
Steps that update BatchNorm statistics keep XLA's path (they need the global batch's moments), as
in `flat_reduce`, and so do parameters of mixed dtypes (the vectors are concatenated); frozen
statistics stay where `sharding.param_shardings` puts them.

Shapes: n = devices on 'data', P_g = group g's padded length (a multiple of n), L = the sum of
P_g / n over the gathered groups, B = global batch, K = classes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from jaxmodels import sharding
from training import optim
from training.config import TrainConfig

DATA = sharding.DATA_AXIS
DECAYED, NOT_DECAYED, FROZEN = "decayed", "not_decayed", "frozen"


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Where each leaf sits in the flat vectors: groups of ``(path, shape)`` in order.

    Attributes:
        groups: ``((group, ((path, shape), ...)), ...)``; empty groups are left out.
        devices: n, the size of the 'data' axis (every group is padded to a multiple of it).
        dtype: the one dtype of every leaf (the vectors are concatenated for the gather).
    """

    groups: tuple[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]], ...]
    devices: int
    dtype: str

    @classmethod
    def of(cls, trainable: Mapping, frozen: Mapping, decay: Mapping[str, bool], devices: int):
        """The layout of a train state's flat ``trainable`` and ``frozen`` dicts, or ``None``
        when their leaves do not share one dtype (then the step keeps XLA's path)."""
        dtypes = {np.dtype(x.dtype).name for x in (*trainable.values(), *frozen.values())}
        if len(dtypes) != 1:
            return None
        members = {
            DECAYED: [k for k in sorted(trainable) if decay[k]],
            NOT_DECAYED: [k for k in sorted(trainable) if not decay[k]],
            FROZEN: sorted(frozen),
        }
        leaves = {**trainable, **frozen}
        groups = tuple(
            (g, tuple((k, tuple(leaves[k].shape)) for k in keys))
            for g, keys in members.items()
            if keys
        )
        return cls(groups, devices, dtypes.pop())

    def names(self, trainable: bool) -> tuple[str, ...]:
        """The trainable groups (``decayed``, ``not_decayed``) or the frozen one, as present."""
        return tuple(g for g, _ in self.groups if (g != FROZEN) == trainable)

    def padded(self, group: str) -> int:
        """P_g: the group's element count rounded up to a multiple of n."""
        size = sum(math.prod(shape) for _, shape in dict(self.groups)[group])
        return -(-size // self.devices) * self.devices

    def decay_mask(self) -> dict[str, bool]:
        """AdamW's weight-decay mask over the flat trainable dict."""
        return {g: g == DECAYED for g in self.names(trainable=True)}

    def flatten(self, tree: Mapping, names) -> dict[str, jax.Array]:
        """``{path: array}`` -> ``{group: [P_g]}`` for the groups in `names` (zero padding)."""
        out = {}
        for g, members in self.groups:
            if g in names:
                flat = jnp.concatenate([jnp.ravel(tree[k]) for k, _ in members])
                out[g] = jnp.pad(flat, (0, self.padded(g) - flat.shape[0]))
        return out

    def unflatten(self, flat: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """``{group: [P_g]}`` -> ``{path: array}`` for the groups present in `flat`."""
        out = {}
        for g, members in self.groups:
            if g in flat:
                start = 0
                for k, shape in members:
                    size = math.prod(shape)
                    out[k] = flat[g][start : start + size].reshape(shape)
                    start += size
        return out


def _map_param_dicts(tree, keys: set, fn: Callable):
    """Applies `fn` to every dict in `tree` whose keys are `keys` (parameters, Adam moments)."""
    is_params = lambda x: isinstance(x, dict) and set(x) == keys
    return jax.tree.map(lambda x: fn(x) if is_params(x) else x, tree, is_leaf=is_params)


def state_to_flat(layout: FlatLayout, state):
    """A pytree-layout `TrainState` -> the flat one (trainable, moments, EMA, frozen)."""
    trainable = layout.names(trainable=True)
    to_flat = lambda tree: layout.flatten(tree, trainable)
    keys = set(state.trainable)
    return state.replace(
        trainable=to_flat(state.trainable),
        frozen=layout.flatten(state.frozen, (FROZEN,)),
        opt_state=_map_param_dicts(state.opt_state, keys, to_flat),
        ema=to_flat(state.ema) if state.ema else {},
    )


def _tree_converter(layout: FlatLayout, state_shardings, mesh: Mesh) -> Callable:
    """``flat_state -> tree_state`` (inverse of `state_to_flat`), placed as `state_shardings`.

    Each vector (a group of the parameters, of a moment, of the EMA) is one call of its group's
    program, which gathers the vector whole and cuts its leaves from it. Cut while split over
    the devices, each leaf's slice was an exchange of its own for the SPMD partitioner, and one
    program over the whole state compiled for 7.9 s where these take 2.6 s (ViT-tiny on 2
    processes x 4 devices; docs/benchmarks.md). Whole, one vector at a time, no device holds more
    than the train step's all-gather of the parameters. Slices are exact: the values are the flat
    state's.
    """
    replicated = sharding.replicated_sharding(mesh)
    leaf_shardings = {**state_shardings.trainable, **state_shardings.frozen}

    def group_program(group, members):
        def unflatten(vector_P):
            whole = jax.lax.with_sharding_constraint(vector_P, replicated)
            return layout.unflatten({group: whole})

        # leaves of one shape share one sharding (`sharding.param_shardings`): the moments and
        # the EMA land where their parameters do
        return jax.jit(unflatten, out_shardings={k: leaf_shardings[k] for k, _ in members})

    programs = {g: group_program(g, members) for g, members in layout.groups}
    trainable_groups = set(layout.names(trainable=True))

    def tree(flat: Mapping) -> dict:
        return {k: v for g, vector in flat.items() for k, v in programs[g](vector).items()}

    def to_tree(state):
        state = state.replace(
            trainable=tree(state.trainable),
            frozen=tree(state.frozen),
            opt_state=_map_param_dicts(state.opt_state, trainable_groups, tree),
            ema=tree(state.ema) if state.ema else {},
        )
        # the step, the counts, the schedule and the statistics are placed alike in both
        # layouts: `device_put` hands them back as they are
        return jax.device_put(state, state_shardings)

    return to_tree


@dataclasses.dataclass(frozen=True)
class FlatSharded:
    """A flat sharded state's layout, optimizer, shardings and its converters.

    Attributes:
        layout: the flat layout.
        optimizer: `optim.make_optimizer` over the flat trainable dict (2-leaf decay mask).
        shardings: the flat `TrainState`'s shardings (vectors split over 'data').
        to_flat: jitted ``tree_state -> flat_state``.
        to_tree: ``flat_state -> tree_state``, placed as `state_shardings` (one program
            per group).
    """

    layout: FlatLayout
    optimizer: optax.GradientTransformation
    shardings: object
    to_flat: Callable
    to_tree: Callable


def build(abstract_state, state_shardings, config: TrainConfig,
          decay: Mapping[str, bool], mesh: Mesh) -> FlatSharded | None:  # fmt: skip
    """The flat sharded state for a run whose pytree state is `abstract_state`.

    Args:
        abstract_state: the pytree `TrainState` (arrays or `jax.ShapeDtypeStruct`s).
        state_shardings: its shardings (from `programs.state_initializer`): `to_tree` returns them.
        config: the run's settings (its optimizer's).
        decay: ``{path: bool}`` weight decay over the trainable leaves.
        mesh: the data mesh.

    Returns:
        A `FlatSharded`, or ``None`` where the leaves do not share one dtype.
    """
    layout = FlatLayout.of(
        abstract_state.trainable, abstract_state.frozen, decay, sharding.data_parallel_size(mesh)
    )
    if layout is None:
        return None
    abstract_flat = jax.eval_shape(lambda s: state_to_flat(layout, s), abstract_state)
    # min_size=1: every padded vector is split, however small; scalars stay replicated
    shardings = sharding.param_shardings(abstract_flat, mesh, min_size=1).replace(
        batch_stats=state_shardings.batch_stats
    )
    to_flat = jax.jit(lambda s: state_to_flat(layout, s), out_shardings=shardings)
    to_tree = _tree_converter(layout, state_shardings, mesh)
    optimizer = optim.make_optimizer(config, layout.decay_mask())
    return FlatSharded(layout, optimizer, shardings, to_flat, to_tree)


def mean_grad_and_metrics(loss_fn: Callable, mesh: Mesh, layout: FlatLayout) -> Callable:
    """The global mean gradient of flat sharded parameters over a batch sharded on 'data', with
    the step's metrics: one all-gather, one reduce-scatter and one all-reduce of 3 floats.

    Args:
        loss_fn: ``loss_fn(trainable, frozen, batch_stats, images, targets, key) ->
            (loss, (logits, batch_stats))`` over ``{path: array}`` dicts; `batch_stats` must come
            back unchanged (see `flat_reduce.value_and_mean_grad`).
        mesh: the data mesh.
        layout: the flat layout of the state's ``trainable`` and ``frozen`` dicts.

    Returns:
        A function of ``(trainable, frozen, batch_stats, images, targets, key, labels_B)`` with
        ``trainable`` = ``{group: [P_g]}`` and ``frozen`` = ``{"frozen": [P_f]}`` (or ``{}``),
        sharded over 'data', returning ``(grads, metrics)``: the global mean gradient as
        ``{group: [P_g]}`` sharded like ``trainable``, and the global batch's mean ``loss``,
        ``accuracy`` (argmax of the logits against ``labels_B``) and the gradient's global
        ``grad_norm``, replicated scalars.
    """
    n = layout.devices
    replicated, sharded = PartitionSpec(), PartitionSpec(DATA)
    trainable_names = layout.names(trainable=True)
    frozen_paths = {k for g, members in layout.groups if g == FROZEN for k, _ in members}

    def split_columns(rows, names):
        """``[r, L]`` -> ``{group: [r, P_g / n]}``: the column blocks of `names` in order."""
        out, start = {}, 0
        for g in names:
            width = layout.padded(g) // n
            out[g] = rows[:, start : start + width]
            start += width
        return out

    def local(trainable, frozen, batch_stats, images, targets, key, labels_B):
        slices = {**trainable, **frozen}  # {group: [P_g / n]}
        names = tuple(slices)
        # row i of the gather is device i's slices: column block g, read row by row, is the
        # whole vector g (device i holds its i-th contiguous slice)
        rows_nL = jax.lax.all_gather(
            jnp.concatenate([slices[g] for g in names]), DATA, to="invarying"
        )
        whole = {g: block.reshape(-1) for g, block in split_columns(rows_nL, names).items()}
        # the gathered vectors are the same on every device (invariant); differentiating them
        # as such would sum the gradients over the devices before the reduce-scatter sums them
        # again (8× too large): marked varying, each device's gradient is its own
        params = layout.unflatten(jax.lax.pcast(whole, DATA, to="varying"))
        trainable_tree = {k: v for k, v in params.items() if k not in frozen_paths}
        frozen_tree = {k: v for k, v in params.items() if k in frozen_paths}
        (loss, (logits, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable_tree, frozen_tree, batch_stats, images, targets, key
        )
        flat = layout.flatten(grads, trainable_names)
        grad_rows_nL = jnp.concatenate([flat[g].reshape(n, -1) for g in trainable_names], axis=1)
        mine_1L = jax.lax.psum_scatter(grad_rows_nL, DATA, scatter_dimension=0, tiled=True) / n
        mine = {g: block[0] for g, block in split_columns(mine_1L, trainable_names).items()}
        # one all-reduce for the three scalars: each is a round trip between processes on gloo
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels_B)
        sums_3 = jax.lax.psum(jnp.stack([loss / n, accuracy / n, jnp.sum(mine_1L**2)]), DATA)
        metrics = {"loss": sums_3[0], "accuracy": sums_3[1], "grad_norm": jnp.sqrt(sums_3[2])}
        return mine, metrics

    def mean_grad(trainable, frozen, batch_stats, images, targets, key, labels_B):
        mapped = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(sharded, sharded, replicated, sharded, sharded, replicated, sharded),
            out_specs=(sharded, replicated),
        )
        return mapped(trainable, frozen, batch_stats, images, targets, key, labels_B)

    return mean_grad
