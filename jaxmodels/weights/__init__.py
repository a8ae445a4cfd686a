"""Weights in and out: torchvision/timm safetensors, big_vision and vision_transformer ``.npz``
files and hubtune's own orbax folders (`checkpoint_io`, reading orbax through `orbax_files` and
checking every key against the model with `key_check`), and the ``[LABEL:]NAME[=CHECKPOINT]``
model references of the command line (`model_refs`)."""

from jaxmodels.weights import (
    checkpoint_io,
    from_npz,
    from_torch,
    key_check,
    model_refs,
    orbax_files,
)

__all__ = ["checkpoint_io", "from_npz", "from_torch", "key_check", "model_refs", "orbax_files"]
