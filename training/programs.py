"""What a fine-tuning run compiles: its train-state initialiser and its train step, built together.

`training.loop.fit` and the scale benchmark (`scripts/benchmarks/scale.py`) take them from
`run_programs`, so both run the same programs: the trainable and weight-decay masks, the optimizer,
where the state lives (replicated, fully sharded per leaf, or a flat sharded state where flat
collectives pay, `training.flat_sharded`) and the jitted step over that state are decided here, in
one place, from the run's config.

They are built once per (model, mode, head, classes, optimizer and step options, preprocessing,
mesh, placement) and memoised in `jaxmodels.jit_cache`: the runs of a sweep differ in learning
rates, seeds and lengths only, which the programs read as data (`optim.schedule_state`), so every
run of a sweep reuses one compilation of each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxmodels import jit_cache, sharding
from jaxmodels.data import preprocess
from jaxmodels.models import paths
from training import flat_reduce, flat_sharded, masks, optim
from training import step as step_lib
from training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class RunPrograms:
    """The compiled pieces of a run (`run_programs`).

    Attributes:
        init: jitted ``init(variables, schedule) -> TrainState``, the step-0 state in the pytree
            layout, placed as `state_shardings`; give it the variables placed with
            `variable_shardings` and the schedule replicated (`initial_state` does both).
        variable_shardings: where the model's variables go before `init`.
        state_shardings: the pytree-layout `TrainState`'s shardings.
        flat: the flat sharded state's layout and converters, or ``None`` (pytree layout).
        train_step: jitted ``train_step(state, batch, key) -> (state, metrics)`` over the state
            in the layout `flat` says (`to_flat` / `to_tree` convert).
        mesh: the data mesh.
    """

    init: Callable
    variable_shardings: Any
    state_shardings: Any
    flat: flat_sharded.FlatSharded | None
    train_step: Callable
    mesh: Mesh

    def initial_state(self, variables: dict, schedule: dict) -> step_lib.TrainState:
        """The step-0 state of `variables` with `schedule` (`optim.schedule_state`), placed; each
        device receives only its shard of the variables, never a full copy first."""
        replicated = sharding.replicated_sharding(self.mesh)
        return self.init(
            sharding.put(variables, self.variable_shardings), sharding.put(schedule, replicated)
        )

    def to_flat(self, state: step_lib.TrainState) -> step_lib.TrainState:
        """A pytree-layout state in the layout `train_step` takes."""
        return self.flat.to_flat(state) if self.flat else state

    def to_tree(self, state: step_lib.TrainState) -> step_lib.TrainState:
        """A state `train_step` returned, in the pytree layout (checkpoints, evaluation, result)."""
        return self.flat.to_tree(state) if self.flat else state


def run_programs(
    model,
    variables: dict,
    config: TrainConfig,
    *,
    num_classes: int,
    preprocessing: preprocess.Preprocessing,
    head_name: str = masks.HEAD_NAME,
    mesh: Mesh,
    flat: bool | None = None,
) -> RunPrograms:
    """The programs of a run of `model` with `config` (module docstring), memoised.

    Args:
        model: a Flax Linen classifier taking ``(variables, images, train=)``.
        variables: its variables (arrays or `jax.ShapeDtypeStruct`s: only shapes are read).
        config: the run's settings: ``mode``, the optimizer's (`optim.compile_key`), the step's
            (`step.compile_key`) and ``shard_params``.
        num_classes: K, the head's size.
        preprocessing: the model's; the step normalises uint8 batches with it.
        head_name: the classifier's top-level module (``head`` for ViT, ``fc`` for ResNet).
        mesh: the data mesh.
        flat: the flat sharded state for ``shard_params``: ``None`` where flat collectives pay
            (`flat_reduce.flat_reduce_pays`, as a run chooses), True or False to force it.

    Returns:
        The `RunPrograms`: the same object for every call with the same compile key, so the
        runs of a sweep share its compilations.

    Raises:
        ValueError: a mode whose mask selects nothing (`masks.trainable_mask`).
    """
    params = variables["params"]
    trainable_mask = masks.trainable_mask(params, config.mode, head_name)
    decay_mask = paths.flatten(masks.weight_decay_mask(params))
    trainable, _ = masks.split_params(params, trainable_mask)
    decay = {k: bool(decay_mask[k]) for k in trainable}
    flat_collectives = flat_reduce.flat_reduce_pays(mesh)
    updates_stats = bool(variables.get("batch_stats")) and config.update_batch_stats
    # BatchNorm statistics that move need the global batch: such steps keep XLA's path
    use_flat = config.shard_params and not updates_stats
    use_flat = use_flat and (flat_collectives if flat is None else flat)
    key = ("run_programs", model, config.mode, head_name, num_classes,
           optim.compile_key(config, decay), step_lib.compile_key(config), preprocessing, mesh,
           config.shard_params, flat_collectives, use_flat)  # fmt: skip

    def build() -> RunPrograms:
        optimizer = optim.make_optimizer(config, decay)
        # shapes only: the rates and the run's length are data, read by the compiled programs
        schedule = jax.eval_shape(lambda: optim.schedule_state(config, 1))
        init, variable_shardings, state_shardings = state_initializer(
            variables, schedule, trainable_mask, optimizer, ema=config.ema_decay is not None,
            mesh=mesh, shard_params=config.shard_params,
        )  # fmt: skip
        flat_state = None
        if use_flat:
            abstract = jax.eval_shape(init, variables, schedule)
            flat_state = flat_sharded.build(abstract, state_shardings, config, decay, mesh)
        train_step = jax.jit(
            step_lib.make_train_step(
                model.apply, flat_state.optimizer if flat_state else optimizer, config,
                num_classes, preprocessing,
                grad_shardings=state_shardings.trainable if config.shard_params else None,
                flat_reduce_mesh=mesh if flat_collectives or flat_state else None,
                flat_layout=flat_state.layout if flat_state else None,
            ),
            out_shardings=(flat_state.shardings if flat_state else state_shardings,
                           sharding.replicated_sharding(mesh)),
            donate_argnums=0,
        )  # fmt: skip
        return RunPrograms(init, variable_shardings, state_shardings, flat_state, train_step, mesh)

    return jit_cache.cached(key, build)


def state_initializer(
    variables, schedule, trainable_mask, optimizer, *, ema: bool, mesh, shard_params: bool
):
    """How the step-0 `TrainState` is built: one jit straight into its shardings on `mesh`.

    Args:
        variables: the model's variables (arrays or `jax.ShapeDtypeStruct`s: only shapes are
            read here).
        schedule: `optim.schedule_state(...)` (or its shapes).
        trainable_mask: from `training.masks.trainable_mask`.
        optimizer: `optim.make_optimizer` over the trainable flat dict.
        ema: keep an EMA of the trainable leaves.
        mesh: the data mesh.
        shard_params: fully shard every leaf (`sharding.param_shardings`), else replicate.

    Returns:
        ``(init, variable_shardings, state_shardings)``: ``init(variables, schedule)`` is jitted
        with ``out_shardings=state_shardings``; give it the variables placed with
        ``sharding.put(variables, variable_shardings)`` (each device then receives only its
        shard of them, never a full copy first) and the schedule replicated. The rates are data,
        so one compiled ``init`` serves every run of a sweep.
    """

    def init(variables, schedule):
        # copies: an output that is an unchanged input would be handed back as the input's
        # buffer, which the train step then donates (the caller's variables must survive)
        variables = jax.tree.map(jnp.copy, variables)
        state = step_lib.init_train_state(
            variables, trainable_mask, optimizer, ema=ema, schedule=schedule
        )
        # the optimizer's starting rate is the run's peak (as `make_optimizer` builds it), read
        # from data rather than from the first run that compiled this function
        opt_state = optim.with_learning_rate(state.opt_state, schedule["peak_lr"])
        return state.replace(opt_state=opt_state)

    abstract = jax.eval_shape(init, variables, schedule)
    state_shardings = sharding.param_shardings(abstract, mesh, shard=shard_params)
    variable_shardings = sharding.param_shardings(variables, mesh, shard=shard_params)
    return jax.jit(init, out_shardings=state_shardings), variable_shardings, state_shardings
