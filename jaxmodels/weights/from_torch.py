"""PyTorch state dicts (torchvision / timm) → jaxmodels' flat parameter layout.

PyTorch stores a conv kernel as [O, I, H, W] and a Linear weight as [out, in]; Flax wants
[H, W, I, O] and [in, out]. BatchNorm's running statistics become the `batch_stats`
collection. timm's ViT fuses the query, key and value projections into one `qkv` Linear whose
output rows are laid out [3, H, Dh]; they are split and reshaped to Flax's DenseGeneral
kernels [D, H, Dh].

Keys of the result are '/'-joined paths starting with the collection, e.g.
'params/layer1_0/conv1/kernel' or 'batch_stats/bn1/mean'. Each converter returns
`(flat, sources, unknown)`: the converted arrays, the checkpoint key each came from (for error
messages) and the checkpoint keys it has no rule for.
"""

from __future__ import annotations

import json
import re
import struct

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

# Bookkeeping entries PyTorch saves that carry no weights.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file into NumPy arrays, bfloat16 tensors included.

    `safetensors.numpy` cannot represent bfloat16 (NumPy has no such dtype); for files that
    hold it, the documented layout is read directly — an 8-byte little-endian header length,
    a JSON header of {name: {dtype, shape, data_offsets}}, then the raw little-endian data —
    and bfloat16 is viewed as `jnp.bfloat16` (ml_dtypes).
    """
    try:
        return load_file(str(path))
    except TypeError as err:
        if "bfloat16" not in str(err):
            raise
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        data = f.read()
    dtypes = {
        "BF16": jnp.bfloat16,
        "F16": np.float16,
        "F32": np.float32,
        "F64": np.float64,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
    }
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"safetensors dtype {info['dtype']} of {name!r} is not supported")
        begin, end = info["data_offsets"]
        dtype = np.dtype(dtypes[info["dtype"]]).newbyteorder("<")
        arrays[name] = np.frombuffer(data[begin:end], dtype).reshape(info["shape"])
    return arrays


def _is_ignored(key: str) -> bool:
    return key.endswith(_IGNORED_SUFFIXES)


def _conv_kernel(w_OIHW: np.ndarray) -> np.ndarray:
    return np.transpose(w_OIHW, (2, 3, 1, 0))


def resnet_from_torch(state: dict[str, np.ndarray]):
    """torchvision/timm ResNet state dict → flat jaxmodels ResNet variables.

    Module paths follow torchvision: 'layer2.0.conv1' → 'layer2_0/conv1',
    'layer2.0.downsample.0'/'.1' → 'layer2_0/downsample_conv'/'downsample_bn'. Leaves by kind:
    4-D 'weight' → conv 'kernel' (OIHW → HWIO), 2-D 'weight' → dense 'kernel' (transposed),
    1-D 'weight' → norm 'scale', 'bias' → 'bias', 'running_mean'/'running_var' →
    batch_stats 'mean'/'var'.

    Args:
      state: checkpoint key → array.

    Returns:
      (flat, sources, unknown) as described in the module docstring.
    """
    flat, sources, unknown = {}, {}, []
    for key, value in state.items():
        if _is_ignored(key):
            continue
        *modules, leaf = key.split(".")
        if len(modules) >= 2 and re.fullmatch(r"layer\d+", modules[0]) and modules[1].isdigit():
            modules = [f"{modules[0]}_{modules[1]}", *modules[2:]]
        if modules[-2:] == ["downsample", "0"]:
            modules = [*modules[:-2], "downsample_conv"]
        elif modules[-2:] == ["downsample", "1"]:
            modules = [*modules[:-2], "downsample_bn"]
        module = "/".join(modules)
        if leaf == "weight" and value.ndim == 4:
            target, array = f"params/{module}/kernel", _conv_kernel(value)
        elif leaf == "weight" and value.ndim == 2:
            target, array = f"params/{module}/kernel", value.T
        elif leaf == "weight" and value.ndim == 1:
            target, array = f"params/{module}/scale", value
        elif leaf == "bias":
            target, array = f"params/{module}/bias", value
        elif leaf == "running_mean":
            target, array = f"batch_stats/{module}/mean", value
        elif leaf == "running_var":
            target, array = f"batch_stats/{module}/var", value
        else:
            unknown.append(key)
            continue
        flat[target], sources[target] = array, key
    return flat, sources, unknown


# timm ViT module → jaxmodels ViT module, inside 'blocks.{i}.' and at the top level.
_VIT_BLOCK_MODULES = {
    "norm1": "LayerNorm_0",
    "attn.proj": "MultiHeadDotProductAttention_1/out",
    "norm2": "LayerNorm_2",
    "mlp.fc1": "MlpBlock_3/Dense_0",
    "mlp.fc2": "MlpBlock_3/Dense_1",
}
_VIT_TOP_MODULES = {
    "patch_embed.proj": "embedding",
    "norm": "Transformer/encoder_norm",
    "head": "head",
}


def vit_from_timm(state: dict[str, np.ndarray], num_heads: int):
    """timm `VisionTransformer` state dict → flat jaxmodels ViT variables.

    Args:
      state: checkpoint key → array ('cls_token', 'pos_embed', 'patch_embed.proj.*',
        'blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*', 'norm.*', 'head.*').
      num_heads: H, needed to split the fused qkv projection into [D, H, Dh] kernels.

    Returns:
      (flat, sources, unknown) as described in the module docstring. A fused qkv whose shape
      cannot be split into 3 × H heads is reported as an unknown key with the reason.
    """
    flat, sources, unknown = {}, {}, []

    def put(target, array, key):
        flat[target], sources[target] = array, key

    for key, value in state.items():
        if _is_ignored(key):
            continue
        if key == "cls_token":
            put("params/cls", value, key)
            continue
        if key == "pos_embed":
            put("params/Transformer/posembed_input/pos_embedding", value, key)
            continue
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if block:
            index, module, leaf = block.groups()
            prefix = f"params/Transformer/encoderblock_{index}"
            if module == "attn.qkv":
                split = _split_qkv(value, leaf, num_heads)
                if split is None:
                    unknown.append(
                        f"{key} (shape {value.shape} does not split into 3 x {num_heads} heads)"
                    )
                    continue
                for name, array in zip(("query", "key", "value"), split, strict=True):
                    target = "kernel" if leaf == "weight" else "bias"
                    put(f"{prefix}/MultiHeadDotProductAttention_1/{name}/{target}", array, key)
                continue
            if module in _VIT_BLOCK_MODULES:
                path = f"{prefix}/{_VIT_BLOCK_MODULES[module]}"
                put(*_leaf(path, module, leaf, value, num_heads), key)
                continue
        top = re.fullmatch(r"(.+)\.(weight|bias)", key)
        if top and top.group(1) in _VIT_TOP_MODULES:
            module, leaf = top.groups()
            put(*_leaf(f"params/{_VIT_TOP_MODULES[module]}", module, leaf, value, num_heads), key)
            continue
        unknown.append(key)
    return flat, sources, unknown


def _leaf(path: str, module: str, leaf: str, value: np.ndarray, num_heads: int):
    """(target key, converted array) for one weight/bias of a ViT Linear, Conv or LayerNorm."""
    if leaf == "bias":
        return f"{path}/bias", value
    if value.ndim == 4:  # patch embedding conv
        return f"{path}/kernel", _conv_kernel(value)
    if value.ndim == 1:  # LayerNorm
        return f"{path}/scale", value
    kernel = value.T  # Linear [out, in] → Dense [in, out]
    if module == "attn.proj" and kernel.shape[0] % num_heads == 0:
        # proj's input is the heads' outputs concatenated as [H, Dh].
        kernel = kernel.reshape(num_heads, kernel.shape[0] // num_heads, kernel.shape[1])
    return f"{path}/kernel", kernel


def _split_qkv(value: np.ndarray, leaf: str, num_heads: int):
    """Splits timm's fused qkv weight [3D, D] or bias [3D] into q, k, v in Flax's layout."""
    rows = value.shape[0]
    if rows % 3 or (rows // 3) % num_heads:
        return None
    width = rows // 3
    head_dim = width // num_heads
    if leaf == "bias":
        return [b.reshape(num_heads, head_dim) for b in np.split(value, 3)]
    if value.ndim != 2:
        return None
    return [w.T.reshape(w.shape[1], num_heads, head_dim) for w in np.split(value, 3)]
