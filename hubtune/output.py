"""One output-folder rule for every hubtune command: a result is never overwritten or mixed.

Each command's ``--out`` folder, once the command has written its result there, holds
``hubtune.json``: which tool wrote it and with which settings. Before any heavy work a command
calls `check`:

* a missing or empty folder: go ahead;
* a folder written by another tool (by its ``hubtune.json``, or by the files that tool writes,
  for folders from before this file existed): refused — a ranking, a run and a soup never share
  a folder;
* this tool's finished result with the same settings: nothing to do (`check` returns the stored
  record; the command prints the stored result and exits 0);
* this tool's finished result with other settings: refused, naming the settings that differ;
* a folder holding other files: refused (hubtune did not write them).

`mark` writes ``hubtune.json`` once the result is written (a partial one, marked so, may be
redone by the same command with the same settings). A command that fails before then
leaves no ``hubtune.json``, so the corrected command is accepted. Fine-tuning keeps its own,
finer rule inside the folder (`training.run`: resume an unfinished run, re-read a finished one)
and passes ``settings=None`` here: only the tool is checked.
"""

from __future__ import annotations

import itertools
import json
import pathlib
from typing import Any

from jaxmodels.atomic_files import write_atomic
from training import run_folder

RECORD = "hubtune.json"
# what each tool writes, to recognise folders written before hubtune.json existed
TOOL_FILES = {
    "rank": ("ranking.json", "ground_truth.json"),
    "tune": (
        run_folder.CONFIG_JSON,
        run_folder.SWEEP_JSON,
        run_folder.RESULT_JSON,
        run_folder.LOCK,
        run_folder.CHECKPOINT_DIR,
        run_folder.METRICS_JSONL,
    ),
    "soup": ("soup.json",),
    "serve": ("cascade.json",),
    "demo": ("report.json", "select", "tune"),  # (an interrupted demo leaves its steps)
}
# files a folder may hold that belong to nobody's result
HARMLESS = {".DS_Store", ".gitkeep"}


class OutputError(ValueError):
    """A folder that cannot take this command's result: one line for the user."""


def free_sibling(out: str | pathlib.Path) -> pathlib.Path:
    """The first of ``OUT-2``, ``OUT-3``, … that is missing or empty: what a refusal suggests."""
    out = pathlib.Path(out)
    siblings = (out.with_name(f"{out.name}-{k}") for k in itertools.count(2))
    return next(s for s in siblings if not s.exists() or (s.is_dir() and not any(s.iterdir())))


def _refuse(out: pathlib.Path, why: str) -> OutputError:
    return OutputError(
        f"--out {str(out)!r} {why}; it is never overwritten: give another folder, e.g. "
        f"--out {str(free_sibling(out))!r}"
    )


def _differences(stored: dict, settings: dict) -> list[str]:
    keys = sorted(set(stored) | set(settings))
    return [
        f"{k}: {stored.get(k)!r} there, {settings.get(k)!r} now"
        for k in keys
        if stored.get(k) != settings.get(k)
    ]


def check(out: str | pathlib.Path, tool: str, settings: dict[str, Any] | None) -> dict | None:
    """Whether `tool` may write its result with `settings` into `out` (module docstring).

    Args:
      out: the command's output folder.
      tool: ``rank``, ``tune``, ``soup``, ``serve`` or ``demo``.
      settings: the JSON-able settings that decide the result; None when the tool checks them
        itself (fine-tuning).

    Returns:
      None to go ahead, or the stored record when this tool's result with these settings is
      already there (nothing to redo).

    Raises:
      OutputError: the folder holds another tool's result, this tool's with other settings, or
        files hubtune did not write.
    """
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {str(out)!r} is a file; give a folder")
    if not out.exists():
        return None
    record_path = out / RECORD
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text())
            owner = record["tool"]
        except (ValueError, KeyError, TypeError) as err:
            raise OutputError(f"{record_path} is damaged ({err}); give another --out") from None
        if owner != tool:
            raise _refuse(out, f"holds the result of `hubtune {owner}`")
        if settings is None:
            return None
        differences = _differences(record.get("settings") or {}, settings)
        if differences:
            raise _refuse(
                out,
                f"holds a `hubtune {tool}` result with other settings ({'; '.join(differences)})",
            )
        # the same command again: nothing to redo, unless its result was partial
        return record if record.get("complete", True) else None
    names = {p.name for p in out.iterdir()} - HARMLESS
    if not names:
        return None
    for owner, files in TOOL_FILES.items():
        if names & set(files):
            if owner == tool and settings is None:
                return None  # the tool's own finer rule decides (a run to resume)
            what = "an earlier result" if owner == tool else f"the result of `hubtune {owner}`"
            raise _refuse(out, f"holds {what} ({', '.join(sorted(names & set(files)))})")
    listed = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    raise _refuse(out, f"holds files hubtune did not write ({listed})")


def mark(
    out: str | pathlib.Path, tool: str, settings: dict[str, Any] | None, *, complete: bool = True
) -> pathlib.Path:
    """Records that `tool` wrote its result into `out` with `settings`; a partial one
    (``complete=False``: some scores failed, say) may be redone by the same command."""
    path = pathlib.Path(out) / RECORD
    record = {"tool": tool, "settings": settings, "complete": complete}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    if not (path.exists() and path.read_text() == text):  # a re-run touches nothing
        write_atomic(path, lambda tmp: tmp.write_text(text))
    return path


def settings_of(args, *, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The result-deciding settings of parsed arguments: all but `ignore` and the output folder,
    paths and numbers as JSON values."""
    skip = {"out", *ignore}
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in sorted(vars(args).items())
        if k not in skip
    }
