"""The members of a committee named on a command line, checked, and their logits on the data.

For `hubtune.serve.report` (`hubtune serve`). A cascade or an ensemble is fitted on
every member's logits over a held-out set and judged on a test set (Wang et al., ICLR 2022).
Here the member references are read and checked before any heavy work, and the logits are
computed once per (member, data set) with `jaxmodels.predict` or read from the
`jaxmodels.inference.artefact_cache`:

  * references: ``[LABEL:]NAME[=CHECKPOINT]``, a model folder, a fine-tuning run folder, or a
    sweep folder (its ``sweep.json``), which stands for all its runs, labelled by run folder
    (``LABEL/RUN`` under a label). A run that has not finished, a sweep listing one, and two
    members with one label are user errors. Run and sweep folders are read through
    `training.run_folder` (`sweep_runs`, `unfinished`), which owns their layout.
  * checks: the members agree on their class count and every label of the held-out and test
    data is one of their classes — from the references alone where they tell (names, model
    folders), again from the logits; logits must be finite.
  * data: each set is decoded and prepared once per distinct preprocessing (`PreparedSets`);
    members of equal preprocessing share the prepared arrays, in the logits passes and in the
    adaptive executor, which takes one array per member.
  * the pool: the candidates by rising cost, their logits stacked per set, with the
    accuracies and simulated cascades the report is made of (`Pool`).

Shapes: N examples, K classes, S image side.

References:
  Wang, Kondratyuk, Christiansen, Kitani, Alon, Eban. "Wisdom of Committees: An Overlooked
  Approach to Faster and More Accurate Models." ICLR 2022. https://arxiv.org/abs/2012.01988
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from jaxmodels.committees import rules as cascade_rules
from jaxmodels.data import sources as data_lib
from jaxmodels.data.preprocess import Preprocessing
from jaxmodels.inference import evaluate as inference
from jaxmodels.inference import prepared as prepared_lib
from jaxmodels.inference.artefact_cache import LogitsCache, ModelFacts
from jaxmodels.weights import model_refs
from jaxmodels.weights.model_refs import ModelRef
from training import run_folder
from training.config import RunError


class CascadeInputError(ValueError):
    """A bad model list, data or option for a cascade report (a one-line user error)."""


# ----------------------------------------------------------------------------- references


def _sweep_runs(folder: pathlib.Path, label: str | None) -> list[ModelRef]:
    """The runs a sweep folder lists (`training.run_folder.sweep_runs`), each a reference
    labelled by its run folder."""
    try:
        runs = run_folder.sweep_runs(folder)
    except RunError as err:
        raise CascadeInputError(str(err)) from None
    refs = []
    for run, finished in runs:
        if not finished or not run.is_dir() or run_folder.unfinished(run):
            raise CascadeInputError(
                f"run {str(run)!r} of sweep {str(folder)!r} has not finished; wait for the "
                "sweep, or list its finished runs one by one"
            )
        name = str(run.relative_to(folder))
        ref = model_refs.parse_model_ref(str(run))
        refs.append(dataclasses.replace(ref, label=f"{label}/{name}" if label else name))
    return refs


def parse_members(texts: Sequence[str]) -> list[ModelRef]:
    """Parses and checks the member references (module docstring); reads no weights.

    Raises:
      CascadeInputError: fewer than two members, an unfinished run, a bad sweep, a label
        used twice.
      jaxmodels.ModelRefError: a reference naming nothing loadable.
    """
    refs = []
    for text in texts:
        label, body = model_refs._split_label(text)
        path = pathlib.Path(body.partition("=")[2] if "=" in body else body)
        if "=" not in body and (path / run_folder.SWEEP_JSON).is_file():
            refs.extend(_sweep_runs(path, label))
            continue
        if run_folder.unfinished(path):
            raise CascadeInputError(
                f"run {str(path)!r} has not finished (no final model in it yet); wait for it or "
                "resume it with hubtune tune"
            )
        refs.append(model_refs.parse_model_ref(text))
    if len(refs) < 2:
        raise CascadeInputError(
            f"a committee needs at least two models; got {len(refs)} ({', '.join(texts)})"
        )
    seen: dict[str, str] = {}
    for ref in refs:
        if ref.label in seen:
            raise CascadeInputError(
                f"two models are labelled {ref.label!r} ({seen[ref.label]!r} and {ref.text!r}); "
                "name them apart with LABEL:MODEL"
            )
        seen[ref.label] = ref.text
    return refs


def check_classes(labels: Sequence[str], num_classes: Sequence[int], sources: dict) -> int:
    """The members' common class count K, with every label of every source below it.

    Args:
      labels: the members' labels.
      num_classes: their class counts (logit widths).
      sources: {role: `ImageSource`}, e.g. {"held-out": ..., "test": ...}.

    Raises:
      CascadeInputError: the members disagree on K.
      jaxmodels.DataError: a source has labels ≥ K.
    """
    if len(set(num_classes)) > 1:
        listing = ", ".join(f"{lab}: {k}" for lab, k in zip(labels, num_classes, strict=True))
        raise CascadeInputError(
            f"the models must share one set of classes to be combined; their class counts "
            f"differ ({listing})"
        )
    for role, source in sources.items():
        data_lib.check_classes_within(source, num_classes[0], role)
    return int(num_classes[0])


def check_logits_finite(label: str, role: str, logits_NK: np.ndarray) -> None:
    """Raises `CascadeInputError` when a member's logits hold NaN or inf (never used silently)."""
    bad = ~np.isfinite(logits_NK)
    if bad.any():
        rows = int(bad.any(axis=1).sum())
        raise CascadeInputError(
            f"model {label!r} gives NaN or infinite logits on {rows} of {len(logits_NK)} "
            f"{role} images; its weights are broken (retrain it, or leave it out)"
        )


# ----------------------------------------------------------------------------- data


class PreparedSets:
    """Each data set decoded and prepared once per distinct preprocessing, on demand.

    Args:
      sources: {role: `ImageSource`}.
      batch_size: global batch of the logits passes (None: `jaxmodels.predict`'s default).
      log: progress printer.
    """

    def __init__(self, sources: dict, batch_size: int | None, log: Callable[[str], None]):
        self.sources, self.batch_size, self.log = sources, batch_size, log
        self._prepared: dict[tuple[str, Preprocessing], prepared_lib.Prepared] = {}
        self._host: dict[tuple[str, Preprocessing], np.ndarray] = {}

    def get(self, role: str, prep: Preprocessing) -> prepared_lib.Prepared:
        """The `role` set prepared with `prep` (made the first time it is asked for)."""
        key = (role, prep)
        if key not in self._prepared:
            source = self.sources[role]
            self.log(
                f"  preparing {role} data {source.spec!r} ({len(source)} images) at "
                f"{prep.image_size} px, {prep.interpolation}"
            )
            self._prepared[key] = prepared_lib.prepare(source, prep, batch_size=self.batch_size)
        return self._prepared[key]

    def host_images(self, role: str, prep: Preprocessing) -> np.ndarray:
        """The prepared images as one host array uint8 [N, S, S, 3] in input order (one object
        per (role, preprocessing), so members of equal preprocessing share it)."""
        key = (role, prep)
        if key not in self._host:
            self._host[key] = self.get(role, prep).host_images()
        return self._host[key]

    def member_inputs(self, role: str, preps: Sequence[Preprocessing]) -> list[np.ndarray]:
        """One array per member, shared between members of equal preprocessing."""
        return [self.host_images(role, prep) for prep in preps]


# ----------------------------------------------------------------------------- logits


@dataclasses.dataclass
class CandidateLogits:
    """One candidate model, by its reference, with its logits on every data set (what a
    committee is fitted on; the `jaxmodels.Member` that runs it is built only for timing).

    Attributes:
      ref: its reference.
      facts: class count, cost, preprocessing.
      logits: {role: logits_NK float32}.
      cache_files: {role: the cache file of those logits}.
      from_cache: {role: whether they were read from the cache}.
      weights_key: its weights' content hash (or random-init seed).
    """

    ref: ModelRef
    facts: ModelFacts
    logits: dict[str, np.ndarray]
    cache_files: dict[str, pathlib.Path]
    from_cache: dict[str, bool]
    weights_key: str


@dataclasses.dataclass(frozen=True)
class Pool:
    """The candidate models, by rising cost, with their logits and the labels of every set
    (a committee's `jaxmodels.Member`s are built from the chosen ones, for timing).

    Attributes:
      candidates: the `CandidateLogits`, cheapest first.
      logits: {role: logits_PNK float32}.
      labels: {role: labels_N}.
      costs: [P] FLOPs per image.
      rule, confidence: how cascades of them decide.
    """

    candidates: list
    logits: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    costs: np.ndarray
    rule: str
    confidence: str

    @property
    def names(self) -> list[str]:
        return [m.ref.label for m in self.candidates]

    def single_accuracy(self, role: str) -> list[float]:
        """Each member's accuracy on `role`."""
        hits_PN = np.argmax(self.logits[role], axis=-1) == self.labels[role][None, :]
        return [float(x) for x in hits_PN.mean(axis=1)]

    def ensemble_accuracy(self, role: str, members) -> float:
        """Accuracy of the mean logits of `members` (the paper's ensemble) on `role`."""
        mean_NK = cascade_rules.mean_logits(self.logits[role][list(members)])
        return float(np.mean(np.argmax(mean_NK, axis=-1) == self.labels[role]))

    def cascade(self, role: str, members, thresholds) -> cascade_rules.CascadeOutput:
        """A cascade of `members` (pool indices by cost) simulated on `role`'s logits."""
        return cascade_rules.simulate_cascade(
            self.logits[role][list(members)],
            thresholds,
            confidence=self.confidence,
            rule=self.rule,
            costs=self.costs[list(members)],
        )


def random_init_classes(facts: Sequence[ModelFacts | None], heldout) -> int:
    """The head size of a random initialisation: the other members' class count, else the
    held-out data's."""
    known = [f.num_classes for f in facts if f is not None]
    return known[0] if known else int(heldout.num_classes)


def member_logits(
    refs: Sequence[ModelRef],
    prepared: PreparedSets,
    cache: LogitsCache,
    *,
    seed: int,
    log: Callable[[str], None],
) -> list[CandidateLogits]:
    """Every member's logits on every set of `prepared`, from the cache or computed.

    A member whose facts and logits are all cached is not built. Checks are made as early as
    the facts allow: class counts and data labels before the first forward pass wherever the
    references tell them, and again on the logits; logits must be finite.

    Args:
      refs: the members (`parse_members`).
      prepared: the data sets (`PreparedSets`; "held-out" is the first role).
      cache: where logits are kept.
      seed: seed of random initialisations (bare ``NAME`` references).
      log: progress printer.

    Returns:
      One `CandidateLogits` per reference, in order.

    Raises:
      CascadeInputError / jaxmodels.DataError: members of different class counts, data with
        labels beyond them, non-finite logits.
      jaxmodels.ModelRefError: a checkpoint that does not load.
    """
    roles = list(prepared.sources)
    sources = prepared.sources
    # A bare NAME is a random initialisation with the others' class count (else the held-out
    # data's); checkpoints' facts do not depend on it.
    checkpoint_facts = [
        cache.facts(
            r, cache.weights_key(r, seed=seed, random_init_classes=1), random_init_classes=1
        )
        for r in refs
        if r.checkpoint is not None
    ]
    classes = random_init_classes(checkpoint_facts, sources[roles[0]])
    keys = [cache.weights_key(ref, seed=seed, random_init_classes=classes) for ref in refs]
    facts = [
        cache.facts(r, k, random_init_classes=classes) for r, k in zip(refs, keys, strict=True)
    ]
    known = [(r.label, f.num_classes) for r, f in zip(refs, facts, strict=True) if f is not None]
    if known:
        check_classes([lab for lab, _ in known], [k for _, k in known], sources)

    results = []
    for i, (ref, key, fact) in enumerate(zip(refs, keys, facts, strict=True), 1):
        tag = f"[{i}/{len(refs)}] {ref.label}"
        files = {role: cache.path(ref, key, fact, sources[role]) for role in roles} if fact else {}
        cached = {role: cache.read(files[role], sources[role]) for role in files}
        if fact is not None and all(x is not None for x in cached.values()):
            log(f"{tag}: logits from the cache")
            results.append(
                CandidateLogits(ref, fact, cached, files, dict.fromkeys(roles, True), key)
            )
            continue
        log(f"{tag}: building {ref.name} from {ref.checkpoint or f'random init (seed {seed})'}")
        built = model_refs.build(ref, init_seed=seed, random_init_classes=classes)
        fact = ModelFacts.of_model(built.model)
        cache.note_facts(ref, key, fact)
        files = {role: cache.path(ref, key, fact, sources[role]) for role in roles}
        logits, hits = {}, {}
        for role in roles:
            found = cache.read(files[role], sources[role])
            hits[role] = found is not None
            if found is None:
                log(f"{tag}: logits on {role} data ({len(sources[role])} images)")
                found = inference.predict(
                    built.model, built.variables, prepared.get(role, fact.preprocessing)
                )
                cache.write(files[role], found, sources[role])
            logits[role] = found
        results.append(CandidateLogits(ref, fact, logits, files, hits, key))
        del built  # one member's weights at a time
    check_classes([m.ref.label for m in results], [m.facts.num_classes for m in results], sources)
    for member in results:
        for role in roles:
            if member.logits[role].shape != (len(sources[role]), member.facts.num_classes):
                raise CascadeInputError(
                    f"cached logits of {member.ref.label!r} on {role} data have shape "
                    f"{member.logits[role].shape}; delete {member.cache_files[role]}"
                )
            check_logits_finite(member.ref.label, role, member.logits[role])
    return results
