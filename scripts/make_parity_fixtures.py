"""Writes PyTorch reference fixtures that prove `jaxmodels.load` reproduces timm/torchvision.

Builds tiny random-initialised PyTorch models — a timm `VisionTransformer` and torchvision
`ResNet`s with BasicBlock and Bottleneck at small widths — saves their state dicts as safetensors
and, next to each, an `.npz` with an input batch (NHWC), the PyTorch logits and features (the
input of the classification head), the architecture settings `jaxmodels.load` needs, and for
the ViT timm's own resampling of the position embedding to other image sizes.

Needs torch, torchvision, timm and safetensors (not hubtune's dependencies): run it once, by hand,
from a separate environment; the tests only read the files it writes.

    /tmp/torchvenv/bin/python scripts/make_parity_fixtures.py --out tests/fixtures
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
from safetensors.numpy import save_file

try:  # only this script needs them; --help works without
    import torch
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn
    from torchvision.models import resnet as tv_resnet
except ImportError as err:
    torch, _IMPORT_ERROR = None, err

SEED = 0
BATCH = 3


def _randomise(model: nn.Module, generator: torch.Generator) -> None:
    """Random values everywhere, BatchNorm statistics included, so no weight goes untested."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            else:
                fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
                scale = 1.0 / np.sqrt(fan_in) if tensor.ndim > 1 else 0.1
                tensor.copy_(scale * torch.randn(tensor.shape, generator=generator))


def _head_input(model: nn.Module, head: nn.Module, images_BCHW: torch.Tensor):
    """Runs the model; returns (logits, the tensor fed to `head`) via a forward hook."""
    seen = {}

    def remember_input(module, args, output):
        seen["x"] = args[0]  # returns None: the module's output is left unchanged

    hook = head.register_forward_hook(remember_input)
    try:
        logits = model(images_BCHW)
    finally:
        hook.remove()
    return logits, seen["x"]


def _small_torchvision_resnet(block, layers, width, num_classes) -> nn.Module:
    """torchvision's ResNet class with every width scaled from 64 down to `width`.

    torchvision hard-codes 64/128/256/512 channels; the same class, blocks and forward are kept
    and only the stem, stages and head are rebuilt narrower with torchvision's `_make_layer`.
    """
    model = tv_resnet.ResNet(block, layers, num_classes=num_classes)
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.layer1 = model._make_layer(block, width, layers[0])
    model.layer2 = model._make_layer(block, 2 * width, layers[1], stride=2)
    model.layer3 = model._make_layer(block, 4 * width, layers[2], stride=2)
    model.layer4 = model._make_layer(block, 8 * width, layers[3], stride=2)
    model.fc = nn.Linear(8 * width * block.expansion, num_classes)
    return model


def _save(out: pathlib.Path, stem: str, model, arrays, config) -> None:
    tensors = {
        k: v.detach().numpy().copy()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    save_file(tensors, str(out / f"{stem}.safetensors"))
    np.savez(out / f"{stem}.npz", config=json.dumps(config), **arrays)
    size = sum((out / f"{stem}{s}").stat().st_size for s in (".safetensors", ".npz"))
    print(f"wrote {stem}.safetensors / .npz ({size / 1024:.0f} KiB), config {config}")


def make_vit(out: pathlib.Path, generator: torch.Generator) -> None:
    config = {
        "name": "vit_ti16",
        "image_size": 32,
        "patch_size": 8,
        "width": 32,
        "depth": 2,
        "num_heads": 2,
        "mlp_dim": 128,
        "num_classes": 5,
    }
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=5
    ).eval()
    _randomise(model, generator)
    images = torch.randn((BATCH, 3, 32, 32), generator=generator)
    with torch.no_grad():
        logits = model(images)
        feats = model.forward_head(model.forward_features(images), pre_logits=True)
        arrays = {
            "images": images.permute(0, 2, 3, 1).numpy(),
            "logits": logits.numpy(),
            "features": feats.numpy(),
        }
        # timm's own resampling (bilinear on the patch grid, class token kept) for 4x4 -> 6x6
        # (image 48) and 4x4 -> 2x2 (image 16).
        for side in (6, 2):
            resampled = resample_abs_pos_embed(
                model.pos_embed,
                [side, side],
                num_prefix_tokens=1,
                interpolation="bilinear",
                antialias=False,
            )
            arrays[f"pos_embed_grid{side}"] = resampled.numpy()
    _save(out, "parity_vit_tiny", model, arrays, config)


def make_resnet(out, generator, stem, block, layers, width, config) -> None:
    model = _small_torchvision_resnet(block, layers, width, num_classes=5).eval()
    _randomise(model, generator)
    # 40 pixels: odd feature-map sides (5, 3) exercise the explicit stride-2 paddings.
    images = torch.randn((BATCH, 3, 40, 40), generator=generator)
    with torch.no_grad():
        logits, feats = _head_input(model, model.fc, images)
    arrays = {
        "images": images.permute(0, 2, 3, 1).numpy(),
        "logits": logits.numpy(),
        "features": feats.numpy(),
    }
    _save(out, stem, model, arrays, config)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("tests/fixtures"),
        help="folder for the parity_* files (default: tests/fixtures)",
    )
    args = parser.parse_args()
    if torch is None:
        parser.error(
            f"needs torch, torchvision and timm ({_IMPORT_ERROR}); e.g. "
            "python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch "
            "torchvision timm safetensors numpy"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    make_vit(args.out, generator)
    make_resnet(
        args.out,
        generator,
        "parity_resnet_basic",
        tv_resnet.BasicBlock,
        [1, 1, 1, 1],
        8,
        {"name": "resnet18", "stage_sizes": [1, 1, 1, 1], "width": 8, "num_classes": 5},
    )
    make_resnet(
        args.out,
        generator,
        "parity_resnet_bottleneck",
        tv_resnet.Bottleneck,
        [1, 2, 1, 1],
        4,
        {"name": "resnet50", "stage_sizes": [1, 2, 1, 1], "width": 4, "num_classes": 5},
    )
    print(f"torch {torch.__version__}; fixtures in {args.out}")


if __name__ == "__main__":
    main()
