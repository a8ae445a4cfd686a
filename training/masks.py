"""Which parameters a fine-tuning mode trains, and which ones weight decay touches.

A mask is a boolean pytree with the structure of the parameters: ``True`` marks a leaf the
mode trains (or decays). Masks are built from parameter *paths* only, so the same rules serve
every architecture that follows the naming conventions below:

- the classifier is a top-level module, ``head`` by default (ViT; ResNet names it ``fc``, see
  :func:`head_name_for`);
- a bias is a leaf named ``bias``; a normalisation scale is a leaf named ``scale``;
- SSF scale/shift parameters are recognised by ``jaxmodels.models.ssf.is_ssf_path`` (a module whose
  name starts with ``ssf_``, holding ``scale`` and ``shift``).

Modes (the baselines of the SSF paper, Lian et al., 2022, Table 1):

- ``full``: every parameter.
- ``linear``: the head only (linear probing).
- ``bitfit``: every bias and the head (BitFit; Ben Zaken et al., ACL 2022).
- ``ssf``: the SSF scale/shift parameters and the head (SSF; Lian et al., NeurIPS 2022).

References:
    Lian, Zhou, Feng, Wang. "Scaling & Shifting Your Features: A New Baseline for Efficient
    Model Tuning", NeurIPS 2022. https://arxiv.org/abs/2210.08823
    Ben Zaken, Ravfogel, Goldberg. "BitFit: Simple Parameter-efficient Fine-tuning for
    Transformer-based Masked Language-models", ACL 2022. https://arxiv.org/abs/2106.10199
"""

from collections.abc import Callable, Mapping

import jax

import jaxmodels
from jaxmodels.models import paths
from jaxmodels.models import ssf as ssf_lib

MODES = ("full", "linear", "bitfit", "ssf")
HEAD_NAME = "head"

PathPredicate = Callable[[tuple[str, ...]], bool]


def path_names(path: tuple[str, ...] | str) -> tuple[str, ...]:
    """Returns a parameter path as a tuple of names (accepts ``"a/b/kernel"`` or a tuple)."""
    if isinstance(path, str):
        return tuple(path.split(paths.SEP))
    return tuple(str(name) for name in path)


def head_name_for(model_name: str) -> str:
    """The classifier module's name for a ``jaxmodels`` model name (``fc`` for ResNets)."""
    return jaxmodels.spec(model_name).head


def is_head_path(path: tuple[str, ...] | str, head_name: str = HEAD_NAME) -> bool:
    """True for the classifier head's leaves (top-level module ``head_name``)."""
    return path_names(path)[0] == head_name


def is_bias_path(path: tuple[str, ...] | str) -> bool:
    """True for bias leaves (named ``bias``): Dense/Conv biases and norm shifts."""
    return path_names(path)[-1] == "bias"


def is_norm_scale_path(path: tuple[str, ...] | str) -> bool:
    """True for normalisation scales (Flax names LayerNorm/BatchNorm/GroupNorm gains ``scale``)."""
    return path_names(path)[-1] == "scale"


def is_ssf_path(path: tuple[str, ...] | str) -> bool:
    """True for SSF scale/shift leaves, as defined by ``jaxmodels.models.ssf``."""
    return bool(ssf_lib.is_ssf_path(path_names(path)))


def _mode_predicate(mode: str, head_name: str) -> PathPredicate:
    is_head = lambda path: is_head_path(path, head_name)
    if mode == "full":
        return lambda path: True
    if mode == "linear":
        return is_head
    if mode == "bitfit":
        return lambda path: is_head(path) or is_bias_path(path)
    if mode == "ssf":
        return lambda path: is_head(path) or is_ssf_path(path)
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")


def _mask_from_predicate(params: Mapping, predicate: PathPredicate) -> dict:
    flat = paths.flatten(_as_dict(params))
    return paths.unflatten({path: bool(predicate(path_names(path))) for path in flat})


def _as_dict(params: Mapping) -> dict:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a nested mapping of arrays (a Flax 'params' collection); "
            f"got {type(params).__name__}"
        )
    return dict(params)


def trainable_mask(params: Mapping, mode: str, head_name: str = HEAD_NAME) -> dict:
    """Builds the boolean pytree of leaves that ``mode`` trains.

    Args:
        params: the ``params`` collection of a Flax model (nested dict of arrays).
        mode: one of ``full``, ``linear``, ``bitfit``, ``ssf``.
        head_name: the top-level classifier module (``head`` for ViT, ``fc`` for ResNet).

    Returns:
        A nested dict with the structure of ``params`` and a Python ``bool`` per leaf.

    Raises:
        ValueError: unknown ``mode``, a mask that selects no leaf, or a mode whose defining
            leaves are missing (``ssf`` on a model created without SSF, ``linear`` on a model
            without a ``head``, ``bitfit`` on a model without biases).
        TypeError: ``params`` is not a mapping.
    """
    predicate = _mode_predicate(mode, head_name)
    mask = _mask_from_predicate(params, predicate)
    # a mode whose defining leaves are absent would silently degrade to linear probing
    required = {
        "linear": lambda path: is_head_path(path, head_name),
        "bitfit": is_bias_path,
        "ssf": is_ssf_path,
    }.get(mode)
    if required is not None and not any(jax.tree.leaves(_mask_from_predicate(params, required))):
        hint = {
            "ssf": "no SSF parameter (module 'ssf_*'); was the model created with ssf=True?",
            "linear": f"no classifier: no top-level module named {head_name!r}",
            "bitfit": "no leaf named 'bias'",
        }[mode]
        raise ValueError(f"mode {mode!r} selects no parameter it is defined by: {hint}")
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"mode {mode!r} selects no parameter of this model")
    return mask


def weight_decay_mask(params: Mapping) -> dict:
    """Marks the leaves that weight decay applies to.

    No decay on SSF scale/shift, biases and normalisation scales (they are per-channel affine
    parameters whose natural value is 1 or 0, so pulling them to 0 is not a regulariser); decay
    on everything else (kernels, embeddings).

    Args:
        params: the ``params`` collection (nested dict of arrays).

    Returns:
        A nested dict with the structure of ``params`` and a Python ``bool`` per leaf.
    """
    return _mask_from_predicate(
        params,
        lambda path: not (is_ssf_path(path) or is_bias_path(path) or is_norm_scale_path(path)),
    )


def split_params(params: Mapping, mask: Mapping) -> tuple[dict, dict]:
    """Splits params into the trainable and frozen parts, as flat ``{path: leaf}`` dicts.

    Differentiating a function of the trainable dict alone means frozen leaves get no
    gradient at all (not a zero one), and an optimizer built over it holds no state for them.

    Args:
        params: nested params.
        mask: boolean pytree with the structure of ``params`` (from :func:`trainable_mask`).

    Returns:
        ``(trainable, frozen)``: flat dicts keyed by ``"a/b/leaf"`` paths.

    Raises:
        ValueError: ``mask`` and ``params`` have different paths.
    """
    flat_params = paths.flatten(_as_dict(params))
    flat_mask = paths.flatten(_as_dict(mask))
    if set(flat_params) != set(flat_mask):
        missing = sorted(set(flat_params) ^ set(flat_mask))[:5]
        raise ValueError(f"mask paths differ from params paths (e.g. {missing})")
    trainable = {k: v for k, v in flat_params.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat_params.items() if not flat_mask[k]}
    return trainable, frozen


def merge_params(trainable: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array]) -> dict:
    """Inverse of :func:`split_params`: nested params from the two flat parts."""
    return paths.unflatten({**frozen, **trainable})


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))
