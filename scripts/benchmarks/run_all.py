"""Every benchmark in one command: results with their provenance, and the docs' tables from them.

    python scripts/benchmarks/run_all.py --out bench-quick            # every quick form
    python scripts/benchmarks/run_all.py --full --only logme,cascade  # some, in full
    python scripts/benchmarks/run_all.py --out bench-quick --docs docs/benchmarks.md
    python scripts/benchmarks/run_all.py --tables bench-quick/results.json --docs docs/benchmarks.md

Each benchmark runs as its own process, one after another (they time themselves against a
baseline in the same process; running two at once would load both). `results.json` records, per
benchmark, its command, exit status, wall time, the load average before and after, the Markdown
tables and ratio lines it printed and its own JSON; and, once, the commit (and whether the tree
was dirty), date, machine, core count, backend and devices. `--docs FILE` rewrites the block
between ``<!-- bench:generated:start -->`` and ``<!-- bench:generated:end -->`` in FILE from
those results, or with `--full` the one between ``<!-- bench:full:start -->`` and
``<!-- bench:full:end -->``, so the quick and the full figures stand side by side (`--tables`
does it from an earlier results.json, e.g. one made on a GPU host). The block is generated from
a record kept beside FILE (``FILE.quick.json`` / ``FILE.full.json``, with each benchmark's own
commit and date) into which every run merges its benchmarks: a partial run (``--only``) updates
its figures and leaves the others'.
Before each benchmark the runner waits (up to two minutes) for the machine to go quiet, so one
benchmark's tail does not load the next. A benchmark is flagged "measured under load" (its
ratios noisier, its seconds not comparable) where the machine did not go quiet before it, or
where other processes kept more than half a core busy on average while it ran: the machine's
busy CPU time (``/proc/stat``) less the benchmark's own (its process tree's rusage). The load
average before and after is recorded but not judged: it lags by a minute, and it counts the
benchmark's own threads (scale starts two processes of four devices each). Records made before
this measurement existed are judged by their load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
# the docs' block that each form rewrites: quick runs and full runs keep their own
MARKERS = {
    False: ("<!-- bench:generated:start -->", "<!-- bench:generated:end -->"),
    True: ("<!-- bench:full:start -->", "<!-- bench:full:end -->"),
}

# name → (quick arguments, full arguments, the flag that names its JSON output)
BENCHMARKS = {
    "logme": (["--quick", "--repeats", "3"], ["--repeats", "5"], "--out"),
    "scores": (["--quick"], [], "--out"),
    "features": (["--quick", "--no-torch"], ["--no-torch"], "--json"),
    "eval": (["--quick"], [], "--json"),
    "pipeline": (["--quick"], [], "--json"),
    "finetune": (["--model", "vit_tiny", "--image-size", "32", "--steps", "3"], [], "--json"),
    "soups": (["--quick"], [], "--json"),
    "cascade": (["--quick"], [], "--json"),
    "scale": (["--quick"], [], "--out"),
    "streamed_stats": (["--quick"], [], "--json"),
}
# On a GPU or TPU host the quick run measures what matters there instead (the accelerator rows):
# ViT-B/16 extraction in bfloat16 as a fraction of the matmul rate, LogME at every size, a
# ViT-S/16 train step in bfloat16; the cascade benchmark's online latency comes with its quick
# form everywhere.
ACCELERATOR_QUICK = {
    "features": ["--models", "vit_b16", "resnet50", "--batch-sizes", "128", "--dtypes",
                 "bfloat16", "float32", "--no-torch"],
    "logme": ["--repeats", "3"],
    "finetune": ["--model", "vit_s16", "--batch-size", "64", "--steps", "10", "--bf16"],
}  # fmt: skip
# other processes' average busy cores above which a figure is flagged as measured under load
OTHERS_BUSY_LIMIT = 0.5
# scripts that are not benchmarks: baselines the benchmarks above run, the suite's compile report
HELPERS = {"run_all", "logme_numpy_baseline", "pipeline_baseline", "suite_compiles"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="bench-results", help="folder for results.json")
    parser.add_argument("--full", action="store_true", help="the full forms (hours on a CPU)")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument(
        "--docs", help="rewrite this Markdown file's generated block (quick or full runs')"
    )
    parser.add_argument("--tables", help="with --docs: build the block from this results.json")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if args.tables and not args.docs:
        parser.error("--tables needs --docs FILE")
    args.names = names
    return args


def _git(*args) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def provenance() -> dict:
    """Where and when: commit, dirty tree, date, machine, CPU, cores, backend and devices."""
    import jax

    from jaxmodels import host

    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
        "cpu": host.cpu_description(),
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
    }


def arguments(name: str, full: bool, backend: str) -> list[str]:
    """The benchmark's arguments: full, quick, or on an accelerator its accelerator form."""
    quick_args, full_args, _ = BENCHMARKS[name]
    if full:
        return full_args
    return ACCELERATOR_QUICK.get(name, quick_args) if backend in ("gpu", "tpu") else quick_args


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (all cores; ``/proc/stat``), or
    None where there is no ``/proc/stat``."""
    try:
        fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds used by this process's finished children (and their children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def settle(max_wait_s: float = 120.0, quiet_cores: float = 0.25, window_s: float = 2.0) -> bool:
    """Waits until the machine's busy cores over `window_s` fall below `quiet_cores` (the last
    benchmark's processes have wound down), at most `max_wait_s`; returns whether it went quiet
    (True where there is no ``/proc/stat`` to tell)."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        before = machine_busy_seconds()
        if before is None:
            return True
        time.sleep(window_s)
        if (machine_busy_seconds() - before) / window_s < quiet_cores:
            return True
    return False


def run_one(name: str, full: bool, out: pathlib.Path, backend: str = "cpu") -> dict:
    json_flag = BENCHMARKS[name][2]
    json_path = out / f"{name}.json"
    command = [sys.executable, str(HERE / f"{name}.py"), *arguments(name, full, backend)]
    command += [json_flag, str(json_path)]
    quiet = settle()
    load_before = os.getloadavg()[0]
    busy_before, own_before = machine_busy_seconds(), children_cpu_seconds()
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=out, env=env)
    seconds = time.perf_counter() - start
    own = children_cpu_seconds() - own_before
    others = None  # other processes' average busy cores while it ran
    if busy_before is not None:
        others = max(0.0, machine_busy_seconds() - busy_before - own) / seconds
    lines = done.stdout.splitlines()
    shown = " ".join(["python", f"scripts/benchmarks/{name}.py", *command[2:-2]])
    return {
        "command": shown,
        "returncode": done.returncode,
        "seconds": seconds,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "quiet_at_start": quiet,
        "cpu_seconds": own,
        "others_busy_cores": others,
        "tables": _tables(lines),
        "ratios": [
            ln.strip()
            for ln in [*lines, *done.stderr.splitlines()]
            if "×" in ln and not ln.startswith("|")
        ],
        "stderr_tail": done.stderr[-2000:] if done.returncode else "",
        # what it printed, for benchmarks whose tables are not Markdown
        "stdout_tail": "\n".join(ln for ln in lines if ln.strip() and "wrote " not in ln)[-3000:],
        "json": json.loads(json_path.read_text()) if json_path.exists() else None,
    }


def _tables(lines: list[str]) -> list[str]:
    """The Markdown tables a benchmark printed, each as one string."""
    tables, current = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    return tables


def _cpu(meta: dict) -> str:
    cpu = meta.get("cpu")  # absent from results recorded before the CPU was
    return f" ({cpu['model']}, {cpu['kind']})" if cpu else ""


def markdown(results: dict) -> str:
    """The docs' generated block: per benchmark, its command, provenance, tables and ratios."""
    meta = results["meta"]
    parts = [
        f"Generated by `python scripts/benchmarks/run_all.py{' --full' if results['full'] else ''}`"
        f" (each benchmark's commit and date below), {meta['machine']}{_cpu(meta)}, "
        f"{meta['cores']} cores, "
        f"JAX {meta['jax']} on {meta['backend']} ({len(meta['devices'])} device(s)). Ratios are "
        "taken within one process; seconds are this machine's."
    ]
    for name, bench in results["benchmarks"].items():
        own = bench.get("meta", meta)
        head = f"### {name}\n\n    {bench['command']}\n\n"
        head += f"commit {own['commit']}{' (dirty tree)' if own['dirty'] else ''}, {own['date']}; "
        head += f"{_load_words(bench, own['cores'])}; {bench['seconds']:.0f} s."
        if bench["returncode"]:
            head += f" **Failed** (exit {bench['returncode']}):\n\n```\n{bench['stderr_tail']}\n```"
        body = [*bench["tables"]]
        if bench["ratios"]:
            body.append("\n".join(f"- {line}" for line in bench["ratios"]))
        if not body and bench.get("stdout_tail"):
            body.append(f"```\n{bench['stdout_tail']}\n```")
        parts.append("\n\n".join([head, *body]))
    return "\n\n".join(parts)


def _load_words(bench: dict, cores: int) -> str:
    """How loaded the machine was: the load average before → after, other processes' busy
    cores where measured, and the flag where the figure was measured under load."""
    words = f"load average {bench['load_before']:.1f} → {bench['load_after']:.1f}"
    others = bench.get("others_busy_cores")  # absent from records made before it was measured
    if others is None:
        loaded = max(bench["load_before"], bench["load_after"]) > cores
        reason = f"load average above {cores} cores"
    else:
        # the load average lags a minute and counts the benchmark's own threads: shown, not judged
        words += f", other processes {others:.2f} cores"
        quiet = bench.get("quiet_at_start", True)
        loaded = not quiet or others > OTHERS_BUSY_LIMIT
        reason = (
            "the machine never went quiet before it"
            if not quiet
            else f"other processes above {OTHERS_BUSY_LIMIT} cores"
        )
    return words + (f" — **measured under load** ({reason})" if loaded else " (quiet)")


def record_path(docs: pathlib.Path, full: bool) -> pathlib.Path:
    """The results a docs block is generated from, kept beside it: ``NAME.quick.json`` or
    ``NAME.full.json``."""
    return docs.with_name(f"{docs.stem}.{'full' if full else 'quick'}.json")


def merged(previous: dict | None, results: dict) -> dict:
    """`previous` record with this run's benchmarks replacing theirs; each benchmark keeps the
    provenance (commit, date, machine) of the run that measured it, so a partial run (--only)
    updates its figures without erasing or re-dating the others'."""
    stamped = {
        name: {"meta": results["meta"], **bench} for name, bench in results["benchmarks"].items()
    }
    old = {} if previous is None else previous["benchmarks"]
    old = {name: {"meta": previous["meta"], **bench} for name, bench in old.items()}
    names = [n for n in BENCHMARKS if n in old or n in stamped]
    names += [n for n in {**old, **stamped} if n not in names]
    both = {**old, **stamped}
    return {
        "meta": results["meta"],
        "full": results["full"],
        "benchmarks": {n: both[n] for n in names},
    }


def write_docs(docs: pathlib.Path, results: dict) -> None:
    """Merges `results` into the record beside `docs` and rewrites its block from the record."""
    start, end = MARKERS[bool(results["full"])]
    text = docs.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"run_all.py: error: {docs} has no {start} … {end} block")
    record = record_path(docs, bool(results["full"]))
    previous = json.loads(record.read_text()) if record.is_file() else None
    results = merged(previous, results)
    record.write_text(json.dumps(results, indent=2) + "\n")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    docs.write_text(f"{before}{start}\n{markdown(results)}\n{end}{after}")
    print(f"wrote the {'full' if results['full'] else 'quick'} runs' block of {docs} ({record})")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tables:
        write_docs(pathlib.Path(args.docs), json.loads(pathlib.Path(args.tables).read_text()))
        return 0
    out = pathlib.Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    results = {"meta": provenance(), "full": args.full, "benchmarks": {}}
    for i, name in enumerate(args.names, 1):
        print(f"[{i}/{len(args.names)}] {name} ...", flush=True)
        bench = run_one(name, args.full, out, results["meta"]["backend"])
        results["benchmarks"][name] = bench
        status = "ok" if bench["returncode"] == 0 else f"FAILED (exit {bench['returncode']})"
        print(f"    {status} in {bench['seconds']:.0f} s, load {bench['load_before']:.1f}")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    if args.docs:
        write_docs(pathlib.Path(args.docs), results)
    return 1 if any(b["returncode"] for b in results["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
