"""A tiny Flax Linen classifier for the training tests (conv, BatchNorm, LayerNorm, SSF, head).

It follows the conventions ``training.masks`` relies on: a top-level ``head`` Dense, biases
named ``bias``, norm gains named ``scale``, and SSF modules ``ssf_<target>`` from
``jaxmodels.models.ssf.maybe_ssf``. Small enough that a step takes milliseconds on a CPU.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.models.ssf import maybe_ssf


class TinyClassifier(nn.Module):
    """Conv(4) → [BatchNorm] → ReLU → mean-pool → LayerNorm → Dense(8, "hidden") → GELU → head(K)."""

    num_classes: int = 3
    ssf: bool = False
    batch_norm: bool = False
    with_head: bool = True

    @nn.compact
    def __call__(self, images_BHWC: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(4, (3, 3), strides=(2, 2), name="conv")(images_BHWC)
        x = maybe_ssf(self.ssf, "conv", x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x)
            x = maybe_ssf(self.ssf, "bn", x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        x = nn.LayerNorm(name="norm")(x)
        x = maybe_ssf(self.ssf, "norm", x)
        x = nn.gelu(nn.Dense(8, name="hidden")(x))
        if not self.with_head:
            return x
        return nn.Dense(self.num_classes, name="head")(x)


@functools.cache  # tests share variables (immutable arrays) instead of re-compiling init
def _init_tiny(seed: int, image_size: int, kwargs: tuple) -> tuple[TinyClassifier, dict]:
    model = TinyClassifier(**dict(kwargs))
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3)))
    return model, jax.tree.map(jnp.asarray, dict(variables))


def init_tiny(seed: int = 0, image_size: int = 8, **kwargs) -> tuple[TinyClassifier, dict]:
    """The model and its variables, initialised on a [1, S, S, 3] input (fresh dicts)."""
    model, variables = _init_tiny(seed, image_size, tuple(sorted(kwargs.items())))
    return model, jax.tree.map(lambda x: x, variables)


def random_variables(model, image_size: int = 32, seed: int = 0) -> dict:
    """Variables shaped like ``model.init``'s, filled with N(0, 0.1²) (BatchNorm ``var`` = 1).

    Faster than a (compiled) ``init`` for the jaxmodels ResNets; tests that only need *some*
    weights of the right structure use it.
    """
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

    return dict(jax.tree_util.tree_map_with_path(fill, dict(shapes)))
