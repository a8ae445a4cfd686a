"""ViT `.npz` checkpoints of google-research/vision_transformer and big_vision → flat layout.

Both projects save a Flax parameter tree flattened with '/' separators. jaxmodels' ViT uses
the original vision_transformer names, so old checkpoints map 1:1; big_vision's refactored
ViT renamed a few modules and moved the position embedding:

  =============================================  ===============================================
  vision_transformer (old)                       big_vision (new)
  =============================================  ===============================================
  Transformer/posembed_input/pos_embedding       pos_embedding  (no entry for the class token:
    [1, 1 + g², D], class token first              it is added before the token is prepended)
  encoderblock_i/MultiHeadDotProductAttention_1  encoderblock_i/MultiHeadDotProductAttention_0
  encoderblock_i/LayerNorm_2                     encoderblock_i/LayerNorm_1
  encoderblock_i/MlpBlock_3                      encoderblock_i/MlpBlock_0
  =============================================  ===============================================

A big_vision position embedding without a class-token row gets a zero row prepended, which
computes exactly the same function (the class token then receives no position term, as in
big_vision). Files may prefix every key with 'opt/target/' (old Flax optimizer checkpoints) or
'params/'; big_vision's scanned encoders ('Transformer/encoderblock/...' with a leading depth
axis) are unstacked into per-block entries.
"""

from __future__ import annotations

import math
import re

import numpy as np

_PREFIXES = ("opt/target/", "params/")
_NEW_TO_OLD_BLOCK_MODULES = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_POS_EMBEDDING = "params/Transformer/posembed_input/pos_embedding"


def vit_from_npz(arrays: dict[str, np.ndarray]):
    """A vision_transformer or big_vision ViT checkpoint → flat jaxmodels ViT variables.

    Args:
      arrays: key → array as stored in the `.npz` (e.g. `dict(np.load(path))`).

    Returns:
      (flat, sources, unknown): converted arrays under 'params/...' keys, the checkpoint key
      each came from, and the checkpoint keys with no rule (none here: every key is mapped and
      names that the model lacks are caught by the caller's comparison).
    """
    flat, sources = {}, {}
    for key, value in _unstack_scanned(_strip_prefix(arrays)).items():
        source = key
        parts = key.split("/")
        if len(parts) >= 3 and parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = _NEW_TO_OLD_BLOCK_MODULES.get(parts[2], parts[2])
        key = "/".join(parts)
        if key in ("pos_embedding", "Transformer/pos_embedding"):
            target, value = _POS_EMBEDDING, _with_class_row(value)
        else:
            target = f"params/{key}"
        flat[target], sources[target] = value, source
    return flat, sources, []


def _strip_prefix(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes one shared 'opt/target/' or 'params/' prefix (only when every key has it)."""
    for prefix in _PREFIXES:
        if arrays and all(k.startswith(prefix) for k in arrays):
            return {k[len(prefix) :]: v for k, v in arrays.items()}
    return dict(arrays)


def _unstack_scanned(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """'Transformer/encoderblock/X' [depth, ...] → 'Transformer/encoderblock_{i}/X' [...]."""
    out = {}
    for key, value in arrays.items():
        match = re.fullmatch(r"Transformer/encoderblock/(.+)", key)
        if not match:
            out[key] = value
            continue
        for i, layer in enumerate(value):
            out[f"Transformer/encoderblock_{i}/{match.group(1)}"] = layer
    return out


def _with_class_row(pos_1ND: np.ndarray) -> np.ndarray:
    """Prepends a zero class-token row when the embedding covers only the patch grid."""
    tokens = pos_1ND.shape[1] if pos_1ND.ndim == 3 else 0
    if tokens and math.isqrt(tokens) ** 2 == tokens:
        zeros = np.zeros((1, 1, pos_1ND.shape[2]), pos_1ND.dtype)
        return np.concatenate([zeros, pos_1ND], axis=1)
    return pos_1ND
