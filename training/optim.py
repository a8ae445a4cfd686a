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


def make_schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to ``peak * end_lr_ratio``."""
    if config.warmup_steps == config.total_steps:  # all warmup: optax's cosine needs >= 1 step
        return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        # optax counts decay_steps from 0, warmup included
        decay_steps=config.total_steps,
        end_value=config.learning_rate * config.end_lr_ratio,
    )


def make_optimizer(
    config: OptimConfig, decay_mask: Mapping[str, bool]
) -> optax.GradientTransformation:
    """AdamW + schedule + clipping for a flat trainable dict.

    Args:
        config: hyper-parameters.
        decay_mask: ``{path: bool}`` with exactly the keys of the trainable flat dict the
            optimizer will be initialised with (True = apply weight decay).

    Returns:
        An optax transformation; ``init`` it with the trainable flat dict only.
    """
    transforms = []
    if config.clip_norm is not None:
        transforms.append(optax.clip_by_global_norm(config.clip_norm))
    transforms.append(
        optax.adamw(
            learning_rate=make_schedule(config),
            b1=config.b1,
            b2=config.b2,
            weight_decay=config.weight_decay,
            mask=dict(decay_mask),
        )
    )
    return optax.chain(*transforms)


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
