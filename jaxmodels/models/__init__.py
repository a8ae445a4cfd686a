"""Architectures and what is known about them: ResNet and ViT in Flax Linen, the registry of
names (preprocessing, head, FLOPs), SSF's scale-and-shift sites and their folding, and the
flat parameter paths that every weight-level algorithm addresses leaves by."""

from jaxmodels.models import paths, registry, resnet, ssf, vit

__all__ = ["paths", "registry", "resnet", "ssf", "vit"]
