"""AdamW with linear warmup + cosine decay and global-norm gradient clipping, over trainable leaves.

The optimizer is built over the *trainable* flat dict from :func:`training.masks.split_params`
only, so frozen leaves carry no optimizer state at all (for SSF on ViT-B/16 that is ~0.2% of
full fine-tuning's Adam moments). Weight decay is decoupled (AdamW) and masked by
:func:`training.masks.weight_decay_mask`.

References:
    Loshchilov, Hutter. "Decoupled Weight Decay Regularization", ICLR 2019.
    https://arxiv.org/abs/1711.05101
    Loshchilov, Hutter. "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017.
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters.

    Attributes:
        learning_rate: peak learning rate reached after warmup.
        total_steps: number of optimizer steps of the whole run (the cosine ends there).
        warmup_steps: linear warmup from 0 to ``learning_rate``.
        end_lr_ratio: final learning rate as a fraction of the peak.
        weight_decay: decoupled weight decay (AdamW), applied to masked-in leaves only.
        clip_norm: clip gradients to this global norm; ``None`` disables clipping.
        b1: Adam first-moment decay.
        b2: Adam second-moment decay.
    """

    learning_rate: float = 1e-3
    total_steps: int = 1000
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.05
    clip_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1; got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}]; "
                f"got {self.warmup_steps}"
            )
        if not 0 <= self.end_lr_ratio <= 1:
            raise ValueError(f"end_lr_ratio must be in [0, 1]; got {self.end_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None; got {self.clip_norm}")


def schedule_state(config: OptimConfig) -> dict[str, jax.Array]:
    """The learning-rate schedule as data: peak and final rates, warmup and total steps.

    A train state carries this dict and `learning_rate` reads it inside the step, so the compiled
    step does not depend on the rates or the run's length: every run of a sweep (learning rates,
    seeds, epochs) reuses one compilation.
    """
    return {
        "peak_lr": jnp.asarray(config.learning_rate, jnp.float32),
        "end_lr": jnp.asarray(config.learning_rate * config.end_lr_ratio, jnp.float32),
        "warmup_steps": jnp.asarray(config.warmup_steps, jnp.int32),
        "total_steps": jnp.asarray(config.total_steps, jnp.int32),
    }


def learning_rate(step, schedule: Mapping[str, jax.Array]) -> jax.Array:
    """Linear warmup from 0 to the peak, then cosine decay to the end rate; float32 scalar.

    Args:
        step: the optimizer step (0-based; the rate used by the update that makes step + 1).
        schedule: from `schedule_state`.
    """
    step = jnp.asarray(step, jnp.float32)
    peak, end = schedule["peak_lr"], schedule["end_lr"]
    warmup = schedule["warmup_steps"].astype(jnp.float32)
    decay = (schedule["total_steps"] - schedule["warmup_steps"]).astype(jnp.float32)
    ramp = peak * step / jnp.maximum(warmup, 1.0)
    progress = jnp.clip((step - warmup) / jnp.maximum(decay, 1.0), 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    # all-warmup schedules (decay == 0) keep ramping to the peak at the last step
    return jnp.where((step < warmup) | (decay == 0), jnp.minimum(ramp, peak), cosine)


def make_schedule(config: OptimConfig):
    """``step -> learning rate`` of `config` (warmup, then cosine), for logging and plots."""
    state = schedule_state(config)
    return lambda step: learning_rate(step, state)


def make_optimizer(
    config: OptimConfig, decay_mask: Mapping[str, bool]
) -> optax.GradientTransformation:
    """Clipping + AdamW for a flat trainable dict, with its learning rate held in its state.

    The rate starts at ``config.learning_rate``; the train step sets each step's scheduled rate
    with `with_learning_rate` (optax's ``inject_hyperparams``), so the compiled update does not
    depend on it.

    Args:
        config: hyper-parameters.
        decay_mask: ``{path: bool}`` with exactly the keys of the trainable flat dict the
            optimizer will be initialised with (True = apply weight decay).

    Returns:
        An optax transformation; ``init`` it with the trainable flat dict only.
    """

    def chain(learning_rate):
        transforms = []
        if config.clip_norm is not None:
            transforms.append(clip_by_global_norm(config.clip_norm))
        transforms.append(
            optax.adamw(
                learning_rate=learning_rate,
                b1=config.b1,
                b2=config.b2,
                weight_decay=config.weight_decay,
                mask=dict(decay_mask),
            )
        )
        return optax.chain(*transforms)

    return optax.inject_hyperparams(chain)(learning_rate=config.learning_rate)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm` (same state, same arithmetic) that takes the norm from its
    caller when given: ``update(grads, state, params, grad_norm=...)``.

    A flat sharded step (`training.flat_sharded`) knows the global norm already, summed with the
    loss in its one small all-reduce; optax's would cost another across processes.
    """

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        trigger = jnp.squeeze(norm < max_norm)
        clip = lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm)
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def with_learning_rate(opt_state, rate: jax.Array):
    """The optimizer state of `make_optimizer` with its learning rate set to `rate`."""
    hyperparams = {**opt_state.hyperparams, "learning_rate": jnp.asarray(rate, jnp.float32)}
    return opt_state._replace(hyperparams=hyperparams)


def compile_key(config: OptimConfig, decay_mask: Mapping[str, bool]) -> tuple:
    """What the compiled update depends on: everything but the schedule's rates and length."""
    return (config.b1, config.b2, config.weight_decay, config.clip_norm,
            tuple(sorted(decay_mask.items())))  # fmt: skip


def init_optimizer(
    config: OptimConfig, trainable: Mapping[str, jax.Array], decay_mask: Mapping[str, bool]
) -> tuple[optax.GradientTransformation, optax.OptState]:
    """Builds the optimizer over ``trainable`` and returns it with its initial state.

    Args:
        config: hyper-parameters.
        trainable: flat ``{path: array}`` trainable dict from ``split_params``.
        decay_mask: flat ``{path: bool}`` decay mask over *all* params (extra keys for frozen
            leaves are dropped here).

    Returns:
        ``(optimizer, opt_state)``.

    Raises:
        ValueError: a trainable path has no entry in ``decay_mask``.
    """
    missing = [k for k in trainable if k not in decay_mask]
    if missing:
        raise ValueError(f"decay_mask has no entry for trainable paths {missing[:5]}")
    optimizer = make_optimizer(config, {k: bool(decay_mask[k]) for k in trainable})
    return optimizer, optimizer.init(dict(trainable))


def tree_bytes(tree) -> int:
    """Bytes held by the array leaves of a pytree (e.g. an optimizer state)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
