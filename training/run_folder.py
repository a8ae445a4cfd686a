"""Run folders: what a fine-tuning run leaves on disk, one process per folder, and `load_run`.

A run folder describes itself, so soups, cascades and the demo rebuild a run from its path alone:

- ``config.json``: the `RunConfig`, written when the run starts;
- ``checkpoints/``: resumable train state with the data iterator's position (orbax);
- ``metrics.jsonl``: training and evaluation metrics, one JSON object per line, each step once;
- ``model/``: the final weights (`jaxmodels.save`; SSF runs folded), whose ``model.json`` records
  the architecture, classes, image size, mode, both seeds, the base checkpoint's content hash, a
  hash of the starting variables, and the data specs;
- ``result.json``: the config, every evaluation, parameter counts, wall time; every path in it is
  relative to the run folder;
- ``lock``: present while a process works on the folder (host and pid inside).

A sweep folder holds one run folder per grid point and ``sweep.json`` (each run's folder, swept
values and final metrics). `load_run` reads either.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import pathlib
import socket
import warnings
from collections.abc import Sequence
from typing import Any

import jaxmodels
from jaxmodels.weights.checkpoint_io import MODEL_JSON
from training.config import RunConfig, RunError

CONFIG_JSON = "config.json"
RESULT_JSON = "result.json"
METRICS_JSONL = "metrics.jsonl"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
LOCK = "lock"
SWEEP_JSON = "sweep.json"


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON at `path`, or None when there is no such file.

    Raises:
      RunError: the file exists but is not valid JSON (named, with the parser's reason).
    """
    path = pathlib.Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path} is not readable JSON ({err})") from err


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Writes JSON atomically (a temporary file renamed over the target): never half-written."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


class FolderLock:
    """An exclusive claim on a run folder: ``lock`` holds the owner's host and pid.

    A second process on the same folder gets a `RunError`; a lock left by a dead process on this
    host is taken over with a warning (a lock from another host cannot be checked and is not).
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = pathlib.Path(folder) / LOCK
        self.held = False

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if not self._is_stale(holder):
                    raise RunError(
                        f"{self.path.parent} is in use by pid {holder.get('pid')} on "
                        f"{holder.get('host')} (since {holder.get('started')}); wait for it, or "
                        f"delete {self.path} if that process is gone"
                    ) from None
                warnings.warn(
                    f"taking over {self.path}: its process (pid {holder.get('pid')}) is gone",
                    stacklevel=2,
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self.held = True
            return self
        raise RunError(f"could not take {self.path}: another process keeps creating it")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):  # a lock being written right now, or garbage
            return {}

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by someone else
            return False
        return False


@dataclasses.dataclass
class Run:
    """A finished run, rebuilt from its folder by `load_run`.

    Attributes:
      folder: the run folder.
      model: the Flax module (plain architecture; SSF runs are stored folded); None when loaded
        with ``weights=False``.
      variables: its final variables; None when loaded with ``weights=False`` (`load` reads them).
      config: the `RunConfig` it ran with.
      result: its ``result.json``.
      info: what the ``model.json`` of its weights records, flattened: ``name``, ``overrides``,
        ``num_classes``, ``image_size`` and the run's facts (``mode``, ``seed``, ``init_seed``,
        ``base_checkpoint_sha256``, ``start_sha256``, ``train_data``, ...).
    """

    folder: pathlib.Path
    model: Any
    variables: dict
    config: RunConfig
    result: dict
    info: dict

    @property
    def name(self) -> str:
        """The folder's name (sweeps name runs by their grid point)."""
        return self.folder.name

    @property
    def preprocessing(self) -> jaxmodels.Preprocessing:
        """The evaluation preprocessing of its model."""
        model = self.model if self.model is not None else self.load()[0]
        return jaxmodels.spec_of(model).preprocessing

    def load(self) -> tuple[Any, dict]:
        """``(model, variables)`` read from its ``model/`` folder now (`jaxmodels.load`): what a
        run described with ``weights=False`` reads when its weights are needed, one run at a
        time (a streamed soup)."""
        return jaxmodels.load(self.folder / MODEL_DIR)


def load_run(folder: str | os.PathLike, *, weights: bool = True) -> Run | list[Run]:
    """Rebuilds a finished run (or every run of a sweep) from its folder alone.

    Args:
      folder: a run folder, or a sweep folder (with ``sweep.json``). Works from any working
        directory: paths inside are relative to the folder.
      weights: read each run's final weights now. False reads only the descriptions (config,
        result, ``model.json``) and leaves ``model`` and ``variables`` None: ``Run.load()``
        reads them later, so many runs need not be in memory at once.

    Returns:
      A `Run`, or for a sweep a list of them in the sweep's order.

    Raises:
      RunError: no run there, an unfinished run, or unreadable files (one line each).
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise RunError(f"run folder {str(folder)!r} does not exist")
    runs = sweep_runs(folder)
    if runs is not None:
        return [_load_one(run, weights) for run, _ in runs]
    return _load_one(folder, weights)


def sweep_runs(folder: str | os.PathLike) -> list[tuple[pathlib.Path, bool]] | None:
    """The runs a sweep folder's ``sweep.json`` lists, in order, each as (its run folder,
    whether the sweep recorded it finished); None where `folder` holds no ``sweep.json``.

    Raises:
      RunError: an unreadable ``sweep.json``, or one that lists no runs.
    """
    folder = pathlib.Path(folder)
    sweep = read_json(folder / SWEEP_JSON)
    if sweep is None:
        return None
    try:
        runs = [(folder / str(e["folder"]), bool(e.get("finished"))) for e in sweep["runs"]]
    except (KeyError, TypeError) as err:
        raise RunError(f"sweep {str(folder)!r} has no readable run list ({err!r})") from None
    if not runs:
        raise RunError(f"sweep {str(folder)!r} lists no runs in {SWEEP_JSON}")
    return runs


def unfinished(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a run folder (it holds ``config.json``) whose run has not finished:
    no final model yet, or a ``result.json`` that is missing, unreadable or not finished. A
    folder that holds no run is not an unfinished one."""
    folder = pathlib.Path(folder)
    if not (folder / CONFIG_JSON).is_file():
        return False
    if not (folder / MODEL_DIR / MODEL_JSON).is_file():
        return True
    try:
        result = read_json(folder / RESULT_JSON)
    except RunError:
        return True
    return not (isinstance(result, dict) and result.get("finished"))


def _load_one(folder: pathlib.Path, weights: bool) -> Run:
    result = read_json(folder / RESULT_JSON)
    if result is None:
        raise RunError(f"{str(folder)!r} is not a run folder (no {RESULT_JSON})")
    if not result.get("finished") or not (folder / MODEL_DIR).is_dir():
        raise RunError(f"run {str(folder)!r} has not finished (no final model yet)")
    model, variables = jaxmodels.load(folder / MODEL_DIR) if weights else (None, None)
    try:
        meta = jaxmodels.model_info(folder / MODEL_DIR)
    except ValueError as err:  # an unreadable model.json: a user error, in one line
        raise RunError(str(err)) from None
    info = {**{k: v for k, v in meta.items() if k not in ("info", "format")}, **meta["info"]}
    config = RunConfig.from_json({**result["config"], "out_dir": str(folder)})
    return Run(folder, model, variables, config, result, info)


def checkpoint_steps(folder: pathlib.Path) -> list[int]:
    """The steps of the checkpoints a run folder holds, ascending."""
    return sorted(int(p.name) for p in (folder / CHECKPOINT_DIR).glob("*") if p.name.isdigit())


def _checkpoint_variables(folder: pathlib.Path, step: int) -> dict:
    """The variables a checkpoint holds (SSF unfolded; EMA weights when EMA was on), as NumPy:
    the checkpoint may come from a sharded or multi-process run."""
    from jaxmodels.models import paths
    from jaxmodels.weights.orbax_files import restore_as_numpy

    # orbax wants absolute paths
    state = restore_as_numpy((folder / CHECKPOINT_DIR / str(step) / "state").absolute())
    trained = state["ema"] or state["trainable"]
    variables = {"params": paths.unflatten({**state["frozen"], **trained})}
    if state["batch_stats"]:
        variables["batch_stats"] = state["batch_stats"]
    return variables


def trained_variables(folder: str | os.PathLike):
    """The variables a finished run trained, as its last checkpoint holds them: SSF unfolded
    (with the SSF module), the EMA weights when EMA was on. `load_run` gives the deployed
    (folded) model; comparing the two checks the fold end to end.

    Returns:
      ``(model, variables)``.

    Raises:
      RunError: not a finished run, or no checkpoint.
    """
    run = _load_one(pathlib.Path(folder).resolve(), weights=True)
    steps = checkpoint_steps(run.folder)
    if not steps:
        raise RunError(f"run {str(run.folder)!r} has no checkpoint")
    variables = _checkpoint_variables(run.folder, steps[-1])
    return run.model.clone(ssf=bool(run.info.get("ssf_folded"))), variables


@dataclasses.dataclass
class CheckpointRun(Run):
    """One kept checkpoint of a finished run, described as a run (its ``folder`` is the
    checkpoint's): `load` reads its weights in the deployed form, SSF folded into the plain
    architecture and the EMA weights when EMA was on, as the run's final model is saved.

    Attributes:
      run_folder: the run it belongs to.
      step: its training step.
    """

    run_folder: pathlib.Path = pathlib.Path()
    step: int = 0

    def load(self) -> tuple[Any, dict]:
        from jaxmodels.models import ssf

        model = _deployed_model(self.run_folder)
        variables = _checkpoint_variables(self.run_folder, self.step)
        return model, ssf.fold(variables) if self.info.get("ssf_folded") else variables


@functools.lru_cache(maxsize=4)
def _deployed_model(run_folder: pathlib.Path):
    """The Flax module of a run's saved model (its weights are read once and dropped)."""
    return jaxmodels.load(run_folder / MODEL_DIR)[0]


def trajectory(folder: str | os.PathLike) -> list[CheckpointRun]:
    """The checkpoints a finished run kept, oldest first: the ingredients of a trajectory soup.

    A run keeps its newest two checkpoints unless it was fine-tuned with ``keep_checkpoints``
    None (``hubtune tune --keep-checkpoints 0``): then every one, each ``checkpoint_every``
    steps and at the end. Nothing heavy is read here (`CheckpointRun.load` reads a checkpoint).

    Raises:
      RunError: not a finished run, or fewer than two checkpoints.
    """
    run = _load_one(pathlib.Path(folder).resolve(), weights=False)
    steps = checkpoint_steps(run.folder)
    if len(steps) < 2:
        raise RunError(
            f"run {str(run.folder)!r} kept {len(steps)} checkpoint(s); a trajectory soup needs "
            "at least 2: fine-tune with --keep-checkpoints 0 and a --checkpoint-every below "
            "the run's steps"
        )
    return [
        CheckpointRun(
            folder=run.folder / CHECKPOINT_DIR / str(step),
            model=None,
            variables=None,
            config=run.config,
            result=run.result,
            info=run.info,
            run_folder=run.folder,
            step=step,
        )
        for step in steps
    ]


def ground_truth(folders: Sequence[str | os.PathLike]) -> dict[str, float]:
    """{base model: fine-tuned accuracy} over the runs in `folders` (run or sweep folders): the
    file ``hubtune rank --ground-truth`` reads.

    Each run counts for the model it started from, keyed by that checkpoint's absolute path (or
    the architecture's name for a random initialisation); a model fine-tuned in several runs (a
    sweep) counts with its best final evaluation accuracy, as the LogME papers take the best
    accuracy over a hyper-parameter grid.

    Raises:
      RunError: a folder that is no finished run or sweep, or a run without an evaluation.
    """
    best: dict[str, float] = {}
    for folder in folders:
        loaded = load_run(folder, weights=False)
        for run in loaded if isinstance(loaded, list) else [loaded]:
            final = run.result.get("final_eval")
            if not final:
                raise RunError(f"run {str(run.folder)!r} has no evaluation (give it --eval-data)")
            ref = jaxmodels.parse_model_ref(run.config.model)
            key = (
                ref.name if ref.checkpoint is None else str(pathlib.Path(ref.checkpoint).resolve())
            )
            best[key] = max(best.get(key, -1.0), float(final["accuracy"]))
    return best
