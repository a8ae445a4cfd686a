"""Committees of models: ensembles and adaptive cascades that run on a device mesh.

Wisdom of Committees (Wang et al., ICLR 2022): an ensemble of off-the-shelf models, or a cascade
that stops at the first stage confident enough, matches a larger model's accuracy at a fraction
of its average cost. This module runs them:

  * `Ensemble(members)` averages the members' logits (or probabilities). Members of one
    architecture — equal apply function, equal variable shapes — run as one `jax.vmap` over their
    stacked variables; members of different architectures run one after another inside the same
    jitted function.
  * `Cascade(members, thresholds)` (`jaxmodels.committees.cascade`) executes adaptively, on
    the devices: each example stops at the first stage confident enough, and only the examples
    still undecided run the next member. Its decisions follow `jaxmodels.committees.rules`,
    which `simulate_cascade` also uses, so the executor and the simulation agree on the same
    logits.

The pieces live in six modules; this one re-exports their public names:
  `jaxmodels.committees.cascade` — the adaptive executor;
  `jaxmodels.committees.rules` — confidences, stage rule, exit rule, `simulate_cascade`;
  `jaxmodels.committees.fit` — `fit_cascade` (thresholds) and `search_cascades` (Pareto frontier);
  `jaxmodels.inference.row_batches` — rows uploaded once, bucketed calls on each device's rows;
  `jaxmodels.committees.members` — `Member`, its inputs and its forward pass.

Both split the rows over the 'data' axis of a `Mesh` (all devices by default) with the
variables replicated, and keep one compiled step per (model, bucket, input shape). Images are
one array [N, H, W, 3] for all members or one array per member (members with different input
sizes); uint8 images are normalised on the device with the member's `Preprocessing`, float
images are used as given. Multi-host: every process passes the same images and gets all
the outputs (`row_batches.DeviceRows`).

Shapes: M members, N images, B rows of one device batch, K classes, H, W image side.

References:
  Wang, Kondratyuk, Christiansen, Kitani, Alon, Eban. "Wisdom of Committees: An Overlooked
  Approach to Faster and More Accurate Models." ICLR 2022. https://arxiv.org/abs/2012.01988
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxmodels import sharding
from jaxmodels.committees import members as members_lib
from jaxmodels.committees import rules as cascade_rules
from jaxmodels.committees.cascade import Cascade
from jaxmodels.committees.fit import CascadeFit, FrontierPoint, fit_cascade, search_cascades
from jaxmodels.committees.members import Member
from jaxmodels.committees.rules import (
    CONFIDENCES,
    CascadeOutput,
    margin,
    max_prob,
    neg_entropy,
    simulate_cascade,
)
from jaxmodels.data.preprocess import Preprocessing
from jaxmodels.inference import row_batches

PyTree = Any

__all__ = [
    "CONFIDENCES",
    "Cascade",
    "CascadeFit",
    "CascadeOutput",
    "Ensemble",
    "FrontierPoint",
    "Member",
    "fit_cascade",
    "margin",
    "max_prob",
    "neg_entropy",
    "search_cascades",
    "simulate_cascade",
]


# ----------------------------------------------------------------------------- ensemble

STRATEGIES = ("vmap", "lax.map", "sequence")
# Strategy="auto" winners by (backend, members' stacking signature, batch rows, mesh).
_AUTO_WINNERS: dict[tuple, str] = {}
_clock = time.perf_counter  # replaced by a fake clock in tests
AUTO_ROUNDS = 3  # timed rounds of one batch per strategy


@dataclasses.dataclass(frozen=True)
class _Group:
    """Members of one architecture: their indices and variables stacked on axis 0."""

    members: tuple[int, ...]
    apply_fn: Any
    preprocessing: Preprocessing | None


class Ensemble:
    """Average of several models' predictions, run as one jitted step per batch.

    ``combine="logits"`` (default; the rule of Wang et al.) returns the weighted mean of the
    members' logits; ``combine="probs"`` averages probabilities and returns their log,
    ``log Σ_m w_m softmax(logits_m)`` — log-probabilities, so argmax and softmax of the result
    are the averaged prediction and probabilities.

    Args:
      members: the `Member`s.
      combine: ``"logits"`` or ``"probs"``.
      weights: non-negative weights [M] with a positive sum (normalised to sum 1); default uniform.
      mesh: a `Mesh` with a 'data' axis; default all devices.
      batch_size: rows per device step, a multiple of the 'data' size; default 256 rounded up
        to one. The last batch is padded to the smallest default bucket that holds it
        (`row_batches.default_buckets`).
      strategy: how members of one architecture run inside the step: ``"vmap"`` over their
        stacked variables, ``"lax.map"`` over the same stack (one member at a time, one
        compiled body), ``"sequence"`` (every member on its own, one after another), or
        ``"auto"`` (default): the fastest of the three on one batch, measured at the first call
        and cached per (backend, members' signature, batch rows). No one strategy wins
        everywhere: on XLA:CPU a vmapped convolution with per-member kernels becomes a grouped
        convolution, slower than separate ones, while matmul models and accelerators gain from
        vmap.

    Raises:
      TypeError / ValueError: empty or malformed members, bad combine, weights, mesh or
        batch size.
    """

    def __init__(
        self,
        members,
        *,
        combine="logits",
        weights=None,
        mesh=None,
        batch_size=None,
        strategy="auto",
    ):
        self.members = members_lib.check_members(members)
        if combine not in ("logits", "probs"):
            raise ValueError(f"combine must be 'logits' or 'probs'; got {combine!r}")
        self.combine = combine
        num_members = len(self.members)
        if weights is None:
            weights_M = np.full(num_members, 1.0 / num_members)
        else:
            weights_M = np.asarray(weights, dtype=np.float64)
            if weights_M.shape != (num_members,):
                raise ValueError(
                    f"weights must have one value per member, shape ({num_members},); got "
                    f"shape {weights_M.shape}"
                )
            if not np.isfinite(weights_M).all() or (weights_M < 0).any() or weights_M.sum() <= 0:
                raise ValueError(
                    f"weights must be finite, non-negative, with a positive sum; got "
                    f"{weights_M.tolist()}"
                )
            weights_M = weights_M / weights_M.sum()
        self.weights = weights_M
        # An argument of the step, not a constant in it: ensembles differing only in weights
        # share one compiled step.
        self.mesh, self.buckets = row_batches.mesh_and_buckets(mesh, batch_size, None)
        self._weights_M = sharding.replicate(np.asarray(weights_M, np.float32), self.mesh)
        self.batch_size = self.buckets[-1]

        if strategy not in ("auto", *STRATEGIES):
            raise ValueError(f"strategy must be 'auto' or one of {STRATEGIES}; got {strategy!r}")
        self.strategy = strategy
        # The strategy that runs: `strategy`, or for "auto" the measured winner once known.
        self.chosen_strategy = None if strategy == "auto" else strategy
        self._by_strategy: dict[str, Ensemble] = {}  # "auto": the measured candidates
        if strategy == "auto":
            self.groups = None  # known once measured
            return
        by_signature: dict[Any, list[int]] = {}
        for i, member in enumerate(self.members):
            key = members_lib.stacking_signature(member) if strategy != "sequence" else i
            by_signature.setdefault(key, []).append(i)
        self._groups, group_variables = [], []
        for indices in by_signature.values():
            first = self.members[indices[0]]
            self._groups.append(_Group(tuple(indices), first.apply_fn, first.preprocessing))
            trees = [self.members[i].variables for i in indices]
            stacked = (
                trees[0] if len(trees) == 1 else jax.tree.map(lambda *xs: np.stack(xs), *trees)
            )
            group_variables.append(stacked)
        self._group_variables = sharding.replicate(group_variables, self.mesh)
        # Member indices run together: one vmap per architecture (public for inspection).
        self.groups = tuple(group.members for group in self._groups)

    def member_logits(self, images) -> np.ndarray:
        """Every member's logits, logits_MNK float32 (one pass over the images)."""
        (logits_NMK,) = self._run(images, combined=False)
        return members_lib.check_finite(np.moveaxis(logits_NMK, 1, 0), "a member")

    def logits(self, images) -> np.ndarray:
        """The combined logits [N, K] float32 (log of averaged probabilities for "probs")."""
        (logits_NK,) = self._run(images, combined=True)
        return members_lib.check_finite(logits_NK, "the ensemble")

    def predict(self, images) -> np.ndarray:
        """The predicted class of each image, [N] int32."""
        return np.argmax(self.logits(images), axis=-1).astype(np.int32)

    def _run(self, images, combined: bool):
        inputs = members_lib.member_inputs(images, self.members)
        if self.strategy == "auto":
            return self._measured(inputs)._run(inputs, combined)
        slots = {id(x): None for x in inputs}  # distinct arrays, in first-use order
        slot_of = {key: i for i, key in enumerate(slots)}
        arrays = [next(x for x in inputs if id(x) == key) for key in slots]
        member_slots = tuple(slot_of[id(x)] for x in inputs)
        key, step = self._step(member_slots, combined)
        rows = row_batches.DeviceRows(arrays, self.mesh, self.buckets)
        consts = (self._group_variables, self._weights_M)
        return row_batches.map_rows(step, consts, rows, key)

    def _measured(self, inputs) -> Ensemble:
        """For "auto": the Ensemble of the strategy that ran one batch fastest (module cache)."""
        rows = min(len(inputs[0]), self.batch_size)
        signature = tuple(members_lib.stacking_signature(m) for m in self.members)
        key = (jax.default_backend(), signature, rows, self.mesh)
        if key not in _AUTO_WINNERS:
            # one slice per distinct array: members sharing images measure the shared program
            sliced = {id(x): x[:rows] for x in inputs}
            batch = [sliced[id(x)] for x in inputs]
            for strategy in STRATEGIES:
                self._with_strategy(strategy).logits(batch)  # compile
            seconds = dict.fromkeys(STRATEGIES, float("inf"))
            for _ in range(AUTO_ROUNDS):  # interleaved, best of: load hits all alike
                for strategy in STRATEGIES:
                    start = _clock()
                    self._with_strategy(strategy).logits(batch)  # NumPy: includes the fetch
                    seconds[strategy] = min(seconds[strategy], _clock() - start)
            fastest = STRATEGIES.index(min(STRATEGIES, key=seconds.__getitem__))
            # multi-host: process 0's measurement decides, so every process runs one program
            _AUTO_WINNERS[key] = STRATEGIES[int(multihost_utils.broadcast_one_to_all(fastest))]
        winner = self._with_strategy(_AUTO_WINNERS[key])
        self.groups, self.chosen_strategy = winner.groups, winner.strategy
        return winner

    def _with_strategy(self, strategy: str) -> Ensemble:
        if strategy not in self._by_strategy:
            self._by_strategy[strategy] = Ensemble(
                self.members,
                combine=self.combine,
                weights=self.weights,
                mesh=self.mesh,
                batch_size=self.batch_size,
                strategy=strategy,
            )
        return self._by_strategy[strategy]

    def _step(self, member_slots: tuple[int, ...], combined: bool):
        """(key, step): the per-batch step for one assignment of input arrays to members, and
        what it depends on (the key of its compiled forms)."""
        groups, combine, strategy = self._groups, self.combine, self.strategy
        key = ("ensemble", tuple(groups), combine, member_slots, combined, strategy)

        def step(group_variables, weights_M, *images):
            out = [None] * len(member_slots)
            for group, variables in zip(groups, group_variables, strict=True):
                slots = [member_slots[m] for m in group.members]
                forward = lambda v, x, g=group: members_lib.forward(
                    g.apply_fn, g.preprocessing, v, x
                )
                if len(slots) == 1:  # a member on its own: no vmap
                    logits_GBK = forward(variables, images[slots[0]])[None]
                elif len(set(slots)) == 1:  # shared images: map over the variables only
                    shared = images[slots[0]]
                    if strategy == "vmap":
                        logits_GBK = jax.vmap(forward, in_axes=(0, None))(variables, shared)
                    else:
                        logits_GBK = jax.lax.map(lambda v, f=forward, x=shared: f(v, x), variables)
                else:
                    images_G = jnp.stack([images[s] for s in slots])
                    if strategy == "vmap":
                        logits_GBK = jax.vmap(forward)(variables, images_G)
                    else:
                        logits_GBK = jax.lax.map(
                            lambda vx, f=forward: f(*vx), (variables, images_G)
                        )
                for j, m in enumerate(group.members):
                    out[m] = logits_GBK[j]
            if len({x.shape for x in out}) != 1:
                raise ValueError(
                    f"members must all return logits of one shape; got {[x.shape for x in out]}"
                )
            logits_MBK = jnp.stack(out)
            if not combined:
                return (jnp.moveaxis(logits_MBK, 0, 1),)
            if combine == "logits":
                return (cascade_rules.mean_logits(logits_MBK, weights_M),)
            log_probs_MBK = jax.nn.log_softmax(logits_MBK, axis=-1)
            return (jax.nn.logsumexp(log_probs_MBK, axis=0, b=weights_M[:, None, None]),)

        return key, step
