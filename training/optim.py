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

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from training.config import TrainConfig

# Adam's moment decays (the paper's, and big_vision's and timm's defaults for fine-tuning)
ADAM_B1, ADAM_B2 = 0.9, 0.999


def schedule_state(config: TrainConfig, steps_per_epoch: int) -> dict[str, jax.Array]:
    """The learning-rate schedule as data: peak and final rates, warmup and total steps.

    Linear warmup to ``config.lr`` over ``config.warmup_epochs``, then cosine decay to zero at
    the run's last step (``config.epochs * steps_per_epoch``). A train state carries this dict
    and `learning_rate` reads it inside the step, so the compiled step does not depend on the
    rates or the run's length: every run of a sweep (learning rates, seeds, epochs) reuses one
    compilation.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1; got {steps_per_epoch}")
    total = config.epochs * steps_per_epoch
    return {
        "peak_lr": jnp.asarray(config.lr, jnp.float32),
        # the schedule ends at zero; the key stays so every checkpoint has one layout
        "end_lr": jnp.asarray(0.0, jnp.float32),
        "warmup_steps": jnp.asarray(
            min(total, round(config.warmup_epochs * steps_per_epoch)), jnp.int32
        ),
        "total_steps": jnp.asarray(total, jnp.int32),
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


def make_schedule(config: TrainConfig, steps_per_epoch: int):
    """``step -> learning rate`` of `config` (warmup, then cosine), for logging and plots."""
    state = schedule_state(config, steps_per_epoch)
    return lambda step: learning_rate(step, state)


def make_optimizer(
    config: TrainConfig, decay_mask: Mapping[str, bool]
) -> optax.GradientTransformation:
    """Clipping + AdamW for a flat trainable dict, with its learning rate held in its state.

    The rate starts at ``config.lr``; the train step sets each step's scheduled rate
    with `with_learning_rate` (optax's ``inject_hyperparams``), so the compiled update does not
    depend on it.

    Args:
        config: the run's settings (``lr``, ``weight_decay``, ``clip_norm``).
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
                b1=ADAM_B1,
                b2=ADAM_B2,
                weight_decay=config.weight_decay,
                mask=dict(decay_mask),
            )
        )
        return optax.chain(*transforms)

    return optax.inject_hyperparams(chain)(learning_rate=config.lr)


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


def compile_key(config: TrainConfig, decay_mask: Mapping[str, bool]) -> tuple:
    """What the compiled update depends on: everything but the schedule's rates and length."""
    return (config.weight_decay, config.clip_norm, tuple(sorted(decay_mask.items())))


def init_optimizer(
    config: TrainConfig, trainable: Mapping[str, jax.Array], decay_mask: Mapping[str, bool]
) -> tuple[optax.GradientTransformation, optax.OptState]:
    """Builds the optimizer over ``trainable`` and returns it with its initial state.

    Args:
        config: the run's settings.
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
