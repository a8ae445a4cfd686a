"""Vision Transformer (ViT) in Flax Linen, laid out like google-research/vision_transformer.

An image is cut into P×P patches, each linearly embedded; a learned class token is prepended, a
learned position embedding added, and pre-norm Transformer blocks
``x + Attn(LN(x))``, ``x + MLP(LN(x))`` follow; the final-normed class token is the representation
and a linear ``head`` classifies it. LayerNorm eps is 1e-6; the MLP's GELU is exact (timm) or the
tanh approximation (big_vision / vision_transformer checkpoints), chosen by ``gelu_approximate``.

Parameter tree (identical to the original ``.npz`` layout, so import is nearly 1:1):
  ``embedding/{kernel [P, P, 3, D], bias [D]}``, ``cls [1, 1, D]``,
  ``Transformer/posembed_input/pos_embedding [1, 1 + (S/P)², D]``,
  ``Transformer/encoderblock_{i}/LayerNorm_0/{scale, bias}``,
  ``Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/``
  ``{kernel [D, H, Dh], bias [H, Dh]}`` and ``.../out/{kernel [H, Dh, D], bias [D]}``,
  ``Transformer/encoderblock_{i}/LayerNorm_2/{scale, bias}``,
  ``Transformer/encoderblock_{i}/MlpBlock_3/{Dense_0 [D, M], Dense_1 [M, D]}/{kernel, bias}``,
  ``Transformer/encoder_norm/{scale, bias}``, ``head/{kernel [D, K], bias [K]}``.
timm's fused ``qkv`` [3D, D] splits into query/key/value (rows q, k, v; each reshaped to [D, H, Dh]
after transposing); ``proj`` [D, D] becomes ``out`` [H, Dh, D]. With SSF, ``ssf_<name>`` submodules
sit next to ``embedding``, ``LayerNorm_0``, ``query``/``key``/``value``, ``out``, ``LayerNorm_2``,
``Dense_0``, ``Dense_1`` and ``encoder_norm`` (see ``jaxmodels.models.ssf``).

Shapes: B batch, S image side, P patch side, N = 1 + (S/P)² tokens, D width, H heads,
Dh = D/H head width, M MLP width, K classes.

References:
  Dosovitskiy et al. "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale."
  ICLR 2021. https://arxiv.org/abs/2010.11929
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.models.ssf import maybe_ssf

LAYER_NORM_EPS = 1e-6
# The original ViT initialisation (vision_transformer / big_vision).
_dense_init = nn.initializers.xavier_uniform()
_bias_init = nn.initializers.normal(stddev=1e-6)
# LeCun normal for the patch embedding, untruncated (quicker to compile than truncated).
_embedding_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


class MultiHeadAttention(nn.Module):
    """Self-attention with separate query/key/value/out DenseGeneral layers (flax's names).

    Attributes:
      num_heads: H.
      ssf: SSF on the query, key and value outputs (together timm's fused qkv) and on ``out``.
      dtype: computation dtype; the softmax runs in float32.
    """

    num_heads: int
    ssf: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BND: jax.Array) -> jax.Array:
        width = x_BND.shape[-1]
        head_dim = width // self.num_heads

        def project(name: str) -> jax.Array:
            y = nn.DenseGeneral(
                (self.num_heads, head_dim),
                kernel_init=_dense_init,
                bias_init=nn.initializers.zeros,
                dtype=self.dtype,
                name=name,
            )(x_BND)
            # Heads-major [B, H, N, Dh] for the two attention matmuls: batched over leading
            # axes, XLA needs no relayout copies (30% faster attention on CPU at ViT-B/16).
            return maybe_ssf(self.ssf, name, y, feature_ndim=2).transpose(0, 2, 1, 3)

        q_BHNd, k_BHNd, v_BHNd = project("query"), project("key"), project("value")
        q_BHNd = q_BHNd / jnp.sqrt(head_dim).astype(q_BHNd.dtype)
        logits_BHNN = jnp.einsum("bhqd,bhkd->bhqk", q_BHNd, k_BHNd)
        weights_BHNN = jax.nn.softmax(logits_BHNN.astype(jnp.float32), axis=-1).astype(self.dtype)
        attended_BNHd = jnp.einsum("bhqk,bhkd->bhqd", weights_BHNN, v_BHNd).transpose(0, 2, 1, 3)
        out = nn.DenseGeneral(
            width,
            axis=(-2, -1),
            kernel_init=_dense_init,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="out",
        )(attended_BNHd)
        return maybe_ssf(self.ssf, "out", out)


class MlpBlock(nn.Module):
    """Dense(M) → GELU → Dense(D), with optional SSF after each Dense (before the GELU)."""

    mlp_dim: int
    gelu_approximate: bool = False
    ssf: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        y = nn.Dense(
            self.mlp_dim,
            kernel_init=_dense_init,
            bias_init=_bias_init,
            dtype=self.dtype,
            name="Dense_0",
        )(x)
        y = maybe_ssf(self.ssf, "Dense_0", y)
        y = nn.gelu(y, approximate=self.gelu_approximate)
        y = nn.Dense(
            width, kernel_init=_dense_init, bias_init=_bias_init, dtype=self.dtype, name="Dense_1"
        )(y)
        return maybe_ssf(self.ssf, "Dense_1", y)


class EncoderBlock(nn.Module):
    """Pre-norm Transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    num_heads: int
    mlp_dim: int
    gelu_approximate: bool = False
    ssf: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="LayerNorm_0")(x)
        y = maybe_ssf(self.ssf, "LayerNorm_0", y)
        y = MultiHeadAttention(
            self.num_heads, ssf=self.ssf, dtype=self.dtype, name="MultiHeadDotProductAttention_1"
        )(y)
        x = x + y
        y = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="LayerNorm_2")(x)
        y = maybe_ssf(self.ssf, "LayerNorm_2", y)
        y = MlpBlock(
            self.mlp_dim, self.gelu_approximate, ssf=self.ssf, dtype=self.dtype, name="MlpBlock_3"
        )(y)
        return x + y


class PositionEmbedding(nn.Module):
    """Adds a learned position embedding ``pos_embedding`` [1, N, D] (BERT init, std 0.02)."""

    @nn.compact
    def __call__(self, x_BND: jax.Array) -> jax.Array:
        pos_1ND = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (1, *x_BND.shape[1:])
        )
        return x_BND + pos_1ND.astype(x_BND.dtype)


class Encoder(nn.Module):
    """Position embedding, ``depth`` encoder blocks and the final LayerNorm."""

    depth: int
    num_heads: int
    mlp_dim: int
    gelu_approximate: bool = False
    ssf: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BND: jax.Array) -> jax.Array:
        x = PositionEmbedding(name="posembed_input")(x_BND)
        for i in range(self.depth):
            x = EncoderBlock(
                self.num_heads,
                self.mlp_dim,
                self.gelu_approximate,
                ssf=self.ssf,
                dtype=self.dtype,
                name=f"encoderblock_{i}",
            )(x)
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="encoder_norm")(x)
        return maybe_ssf(self.ssf, "encoder_norm", x)


class VisionTransformer(nn.Module):
    """ViT classifier; ``__call__`` gives logits, ``features`` the final-normed class token.

    Attributes:
      num_classes: K, size of the ``head``.
      image_size: S, the input side the position embedding is made for.
      patch_size: P; S must be a multiple of P.
      width: D.
      depth: number of encoder blocks.
      num_heads: H; D must be a multiple of H.
      mlp_dim: M.
      gelu_approximate: tanh-approximate GELU (big_vision/vision_transformer) instead of exact
        (timm).
      ssf: insert SSF at the reference sites (``jaxmodels.models.ssf``).
      dtype: computation dtype (parameters stay float32; logits are returned as float32).
    """

    num_classes: int
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    gelu_approximate: bool = False
    ssf: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, *, features_only: bool = False
    ) -> jax.Array:
        """Runs the network.

        Args:
          images: [B, S, S, 3] float, already preprocessed.
          train: accepted for a uniform interface with ResNet; ViT has no train-time state here.
          features_only: return the features [B, D] instead of the logits.

        Returns:
          logits [B, K] (float32), or features [B, D] (float32).
        """
        del train
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be [B, {self.image_size}, {self.image_size}, 3] (NHWC, image_size="
                f"{self.image_size}); got shape {images.shape}"
            )
        x = nn.Conv(
            self.width,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            kernel_init=_embedding_init,
            dtype=self.dtype,
            name="embedding",
        )(jnp.asarray(images, self.dtype))
        x = maybe_ssf(self.ssf, "embedding", x)
        batch = x.shape[0]
        x_BND = jnp.reshape(x, (batch, -1, self.width))
        cls_11D = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
        cls_B1D = jnp.broadcast_to(cls_11D.astype(x_BND.dtype), (batch, 1, self.width))
        x_BND = jnp.concatenate([cls_B1D, x_BND], axis=1)
        x_BND = Encoder(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.gelu_approximate,
            ssf=self.ssf,
            dtype=self.dtype,
            name="Transformer",
        )(x_BND)
        feats_BD = x_BND[:, 0].astype(jnp.float32)
        if features_only:
            return feats_BD
        logits = nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="head",
        )(feats_BD)
        return logits.astype(jnp.float32)

    def features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """The final-normed class token [B, D], the input of ``head`` (what LogME scores)."""
        return self(images, train, features_only=True)


def vit_macs(
    *,
    image_size: int,
    patch_size: int,
    width: int,
    depth: int,
    mlp_dim: int,
    num_classes: int,
    **_unused,
) -> int:
    """Multiply-accumulates of one forward pass: patch embedding, blocks and head.

    Per block with N tokens: query/key/value/out projections ``4·N·D²``, the two attention
    matmuls ``2·N²·D``, the MLP ``2·N·D·M``. LayerNorm, softmax, GELU and adds are not counted.
    """
    grid = image_size // patch_size
    tokens = grid * grid + 1
    embed = grid * grid * patch_size * patch_size * 3 * width
    block = 4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp_dim
    return embed + depth * block + width * num_classes
