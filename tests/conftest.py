"""Test setup: 8 fake CPU devices, so every multi-device path runs on a laptop or CI, and
implicit rank promotion is an error, so silent broadcasting fails loudly."""

import os

# Must happen before JAX initialises its backends (i.e. before any array is made).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
