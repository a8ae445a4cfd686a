"""ResNet-18/34/50/101/152 in Flax Linen, laid out like torchvision's (ResNet v1.5).

Deep residual networks stack residual blocks ``relu(x + F(x))`` in four stages after a 7×7 stem.
This is torchvision's variant "v1.5": in a bottleneck block the stride sits on the 3×3 conv (not the
first 1×1), every padding is explicit (stem conv 7×7 s2 pad 3, max-pool 3×3 s2 pad 1, 3×3 convs
pad 1, 1×1 convs pad 0) so stride-2 layers sample the same pixels as PyTorch ('SAME' would pad the
bottom/right only), BatchNorm has eps 1e-5 and momentum 0.1 in PyTorch terms (Flax momentum 0.9).

Parameter names mirror torchvision's state-dict keys; the import rule is "replace the first two dots
``layerS.B.`` with ``layerS_B/``, ``downsample.0``/``downsample.1`` with ``downsample_conv`` /
``downsample_bn``, and map leaves":
  ``conv1.weight`` → ``params/conv1/kernel`` (OIHW → HWIO),
  ``bn1.{weight,bias}`` → ``params/bn1/{scale,bias}``,
  ``bn1.{running_mean,running_var}`` → ``batch_stats/bn1/{mean,var}``,
  ``layer2.0.conv1.weight`` → ``params/layer2_0/conv1/kernel``,
  ``layer2.0.downsample.0.weight`` → ``params/layer2_0/downsample_conv/kernel``,
  ``layer2.0.downsample.1.*`` → ``.../layer2_0/downsample_bn/*``,
  ``fc.{weight,bias}`` → ``params/fc/{kernel (transposed), bias}``.
With SSF, a ``ssf_<bn>`` submodule follows every BatchNorm (see ``jaxmodels.models.ssf``).

Shapes: B batch, H/W image height/width, C channels; images are NHWC.

References:
  He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition." CVPR 2016.
  https://arxiv.org/abs/1512.03385
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.models.ssf import maybe_ssf

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu"): an
# untruncated normal ("normal" in jax.nn.initializers; "truncated_normal" is the other).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_fc_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

BLOCK_KINDS = ("basic", "bottleneck")


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
    """A bias-free conv with torchvision's explicit symmetric padding ``kernel // 2``."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_conv_init,
        dtype=dtype,
        name=name,
    )


def _batch_norm(train: bool, name: str, dtype: Any, zero_init: bool = False) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
        dtype=dtype,
        name=name,
    )


class ResidualBlock(nn.Module):
    """A BasicBlock (two 3×3 convs) or a Bottleneck (1×1, 3×3 with the stride, 1×1 ×4).

    Attributes:
      features: the block's inner width (its output has ``features * expansion`` channels).
      stride: spatial stride of the block (on the 3×3 conv).
      kind: ``'basic'`` or ``'bottleneck'``.
      ssf: insert SSF after every BatchNorm.
      zero_init_last_bn: initialise the last BatchNorm's scale to zero (block starts as identity).
      dtype: computation dtype.
    """

    features: int
    stride: int
    kind: str
    ssf: bool = False
    zero_init_last_bn: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.kind == "basic":
            plan = [(3, self.stride, self.features), (3, 1, self.features)]
            out_features = self.features
        else:
            plan = [
                (1, 1, self.features),
                (3, self.stride, self.features),
                (1, 1, 4 * self.features),
            ]
            out_features = 4 * self.features
        y = x
        for i, (kernel, stride, features) in enumerate(plan, start=1):
            last = i == len(plan)
            y = _conv(features, kernel, stride, f"conv{i}", self.dtype)(y)
            y = _batch_norm(train, f"bn{i}", self.dtype, last and self.zero_init_last_bn)(y)
            y = maybe_ssf(self.ssf, f"bn{i}", y)
            if not last:
                y = nn.relu(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_features:
            shortcut = _conv(out_features, 1, self.stride, "downsample_conv", self.dtype)(x)
            shortcut = _batch_norm(train, "downsample_bn", self.dtype)(shortcut)
            shortcut = maybe_ssf(self.ssf, "downsample_bn", shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet classifier; ``__call__`` gives logits, ``features`` the pooled representation.

    Attributes:
      num_classes: size of the ``fc`` head.
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: ``'basic'`` (ResNet-18/34) or ``'bottleneck'`` (ResNet-50/101/152).
      width: channels of the stem and first stage (64 in the paper); stage s has ``width·2^s``.
      ssf: insert SSF after every BatchNorm (``jaxmodels.models.ssf``).
      zero_init_last_bn: zero-init the last BatchNorm scale of each block.
      image_size: the side S of the images it is evaluated on (the centre crop of its
        preprocessing, ``jaxmodels.spec``). The network is fully convolutional and accepts any
        size; this records the one its weights were trained for, so a loaded model knows its input.
      dtype: computation dtype (parameters stay float32).
    """

    num_classes: int
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"
    width: int = 64
    ssf: bool = False
    zero_init_last_bn: bool = False
    image_size: int = 224
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, *, features_only: bool = False
    ) -> jax.Array:
        """Runs the network.

        Args:
          images: [B, H, W, 3] float, already preprocessed (normalised).
          train: use batch statistics and update ``batch_stats`` (apply with
            ``mutable=['batch_stats']``); False uses the running averages.
          features_only: return the pooled features [B, D] instead of the logits.

        Returns:
          logits [B, num_classes] (float32), or features [B, D] with D = width·8·expansion.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] (NHWC); got shape {images.shape}")
        x = jnp.asarray(images, self.dtype)
        x = _conv(self.width, 7, 2, "conv1", self.dtype)(x)
        x = _batch_norm(train, "bn1", self.dtype)(x)
        x = maybe_ssf(self.ssf, "bn1", x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for b in range(num_blocks):
                x = ResidualBlock(
                    features=self.width * 2**stage,
                    stride=2 if (stage > 0 and b == 0) else 1,
                    kind=self.block,
                    ssf=self.ssf,
                    zero_init_last_bn=self.zero_init_last_bn,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{b}",
                )(x, train)
        feats = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if features_only:
            return feats
        logits = nn.Dense(self.num_classes, kernel_init=_fc_init, dtype=self.dtype, name="fc")(
            feats
        )
        return logits.astype(jnp.float32)

    def features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Global-average-pooled features [B, D], the input of ``fc`` (what LogME scores)."""
        return self(images, train, features_only=True)


def resnet_macs(
    *,
    stage_sizes: Sequence[int],
    block: str,
    width: int,
    num_classes: int,
    image_size: int,
    count_padding: bool = True,
) -> int:
    """Multiply-accumulates of one forward pass at ``image_size × image_size`` (convs and fc).

    Args:
      stage_sizes, block, width, num_classes: the ``ResNet`` fields.
      image_size: input side S.
      count_padding: count every kernel tap of every output position, padded ones included
        (``H_out·W_out·k²·C_in·C_out``; the convention of fvcore and torchvision's published
        tables), or only the taps that land inside the input (what XLA's cost analysis counts).

    Returns:
      The count; BatchNorm, ReLU, pooling and residual adds are not counted (< 1% of ResNet-50).
    """

    def out_side(side: int, kernel: int, stride: int) -> int:
        return (side + 2 * (kernel // 2) - kernel) // stride + 1

    def taps_1d(side: int, kernel: int, stride: int) -> int:
        """Sum over output positions of the kernel taps along one axis that are not padding."""
        if count_padding:
            return out_side(side, kernel, stride) * kernel
        pad = kernel // 2
        return sum(
            sum(1 for k in range(kernel) if 0 <= o * stride - pad + k < side)
            for o in range(out_side(side, kernel, stride))
        )

    def conv(side: int, kernel: int, stride: int, c_in: int, c_out: int) -> int:
        return taps_1d(side, kernel, stride) ** 2 * c_in * c_out

    macs = conv(image_size, 7, 2, 3, width)
    side = out_side(out_side(image_size, 7, 2), 3, 2)  # stem conv, then max-pool
    channels = width
    for stage, num_blocks in enumerate(stage_sizes):
        features = width * 2**stage
        for b in range(num_blocks):
            stride = 2 if (stage > 0 and b == 0) else 1
            if block == "basic":
                plan, out_channels = [(3, stride, features), (3, 1, features)], features
            else:
                plan = [(1, 1, features), (3, stride, features), (1, 1, 4 * features)]
                out_channels = 4 * features
            in_side, c_in = side, channels
            for kernel, s, c_out in plan:
                macs += conv(side, kernel, s, c_in, c_out)
                side, c_in = out_side(side, kernel, s), c_out
            if stride != 1 or channels != out_channels:
                macs += conv(in_side, 1, stride, channels, out_channels)
            channels = out_channels
    return macs + channels * num_classes
