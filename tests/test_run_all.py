"""The benchmark runner: it knows every benchmark, and its docs block flags loaded runs."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmarks"


def _script(name):
    """scripts/benchmarks/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_all():
    return _script("run_all")


def test_every_benchmark_script_is_run():
    run_all = _run_all()
    scripts = {p.stem for p in BENCH.glob("*.py")}
    assert scripts - run_all.HELPERS == set(run_all.BENCHMARKS)


def fake_results(load, cores=2, returncode=0):
    return {
        "full": False,
        "meta": {
            "commit": "abc1234",
            "dirty": False,
            "date": "2026-12-05 03:00 UTC",
            "machine": "x86_64",
            "cores": cores,
            "backend": "cpu",
            "devices": ["cpu:0"],
            "jax": "0.10.2",
        },
        "benchmarks": {
            "soups": {
                "command": "python scripts/benchmarks/soups.py --quick",
                "returncode": returncode,
                "seconds": 12.0,
                "load_before": load,
                "load_after": load,
                "tables": ["| a | b |\n|---|---|\n| 1 | 2 |"],
                "ratios": ["uniform soup: 1.50× the loop"],
                "stderr_tail": "boom" if returncode else "",
                "json": None,
            }
        },
    }


@pytest.mark.parametrize("full", [False, True], ids=["quick", "full"])
@pytest.mark.parametrize("load, flagged", [(1.5, False), (2.5, True)])
def test_the_docs_block_carries_command_commit_and_load(tmp_path, load, flagged, full):
    run_all = _run_all()
    (quick_start, quick_end), (full_start, full_end) = run_all.MARKERS[False], run_all.MARKERS[True]
    docs = tmp_path / "b.md"
    docs.write_text(
        f"# B\n\nprose\n\n{quick_start}\nold quick\n{quick_end}\n\n"
        f"{full_start}\nold full\n{full_end}\n\nafter\n"
    )
    results = tmp_path / "results.json"
    results.write_text(json.dumps({**fake_results(load), "full": full}))
    assert run_all.main(["--tables", str(results), "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert text.startswith("# B\n\nprose\n") and text.endswith("after\n")
    # each form rewrites its own block and leaves the other's figures
    assert ("old quick" in text) == full and ("old full" in text) != full
    written = text.split(full_start if full else quick_start)[1].split(
        full_end if full else quick_end
    )[0]
    assert "python scripts/benchmarks/soups.py --quick" in written and "abc1234" in written
    assert "| 1 | 2 |" in written and "- uniform soup: 1.50× the loop" in written
    assert ("measured under load" in written) == flagged


@pytest.mark.parametrize(
    "before, after, others, quiet, flagged",
    [
        (0.3, 6.0, 0.1, True, False),  # its own processes raised the load average: quiet
        (2.5, 2.5, 0.1, True, False),  # the last benchmark's load still decaying: quiet
        (0.3, 0.5, 0.8, True, True),  # another process kept most of a core busy
        (2.5, 2.5, 0.0, False, True),  # the machine never went quiet before it
    ],
)
def test_load_is_judged_by_the_other_processes_cpu(before, after, others, quiet, flagged):
    run_all = _run_all()
    results = fake_results(before)
    results["benchmarks"]["soups"].update(
        load_after=after, others_busy_cores=others, quiet_at_start=quiet
    )
    text = run_all.markdown(results)
    assert f"other processes {others:.2f} cores" in text
    assert ("measured under load" in text) == flagged


def test_a_benchmarks_own_cpu_is_not_counted_as_others(tmp_path):
    """Two busy processes of its own, on this machine: its CPU time is its own, not load."""
    run_all = _run_all()
    if run_all.machine_busy_seconds() is None:
        pytest.fail("no /proc/stat: the load measurement cannot run here")
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
    (tmp_path / "burn.py").write_text(burn)
    busy, own = run_all.machine_busy_seconds(), run_all.children_cpu_seconds()
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "burn.py")]) for _ in range(2)]
    for proc in procs:
        proc.wait()
    wall = time.perf_counter() - start
    spent = run_all.children_cpu_seconds() - own
    machine = run_all.machine_busy_seconds() - busy
    assert spent >= 1.0
    # both count seconds of CPU: the machine's busy time holds the children's, and no more
    # than every core's
    assert 0.9 * spent <= machine <= os.cpu_count() * wall + 0.5


def test_a_partial_run_updates_its_figures_and_keeps_the_others(tmp_path):
    run_all = _run_all()
    start, end = run_all.MARKERS[False]
    docs = tmp_path / "b.md"
    docs.write_text(f"# B\n\n{start}\n{end}\n")
    first = fake_results(0.5)
    assert run_all.main(["--tables", _json(tmp_path / "1.json", first), "--docs", str(docs)]) == 0
    later = fake_results(0.7)
    later["meta"] = {**later["meta"], "commit": "def5678", "date": "2026-12-06 02:00 UTC"}
    later["benchmarks"] = {
        "cascade": {
            **later["benchmarks"]["soups"],
            "command": "python scripts/benchmarks/cascade.py --quick",
        }
    }
    assert run_all.main(["--tables", _json(tmp_path / "2.json", later), "--docs", str(docs)]) == 0
    text = docs.read_text()
    soups, cascade = text.split("### soups")[1], text.split("### cascade")[1]
    assert "commit abc1234, 2026-12-05 03:00 UTC" in soups.split("###")[0]
    assert "commit def5678, 2026-12-06 02:00 UTC" in cascade
    assert text.index("### soups") < text.index("### cascade")  # the benchmarks' own order
    record = json.loads(run_all.record_path(docs, False).read_text())
    assert list(record["benchmarks"]) == ["soups", "cascade"]


def _json(path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def test_a_failed_benchmark_is_shown_as_failed(tmp_path):
    run_all = _run_all()
    text = run_all.markdown(fake_results(0.5, returncode=3))
    assert "**Failed** (exit 3)" in text and "boom" in text


def test_an_accelerator_host_runs_the_accelerator_forms():
    """On a GPU/TPU the quick run measures the accelerator rows (ViT-B/16 bfloat16 extraction,
    LogME at every size, a bfloat16 ViT-S/16 step); on a CPU the quick forms."""
    run_all = _run_all()
    for name in run_all.BENCHMARKS:
        assert run_all.arguments(name, False, "cpu") == run_all.BENCHMARKS[name][0]
        assert run_all.arguments(name, True, "gpu") == run_all.BENCHMARKS[name][1]
    assert "vit_b16" in run_all.arguments("features", False, "gpu")
    assert "bfloat16" in run_all.arguments("features", False, "tpu")
    assert "--quick" not in run_all.arguments("logme", False, "gpu")
    assert "--bf16" in run_all.arguments("finetune", False, "gpu")
    sys.path.insert(0, str(BENCH))  # the scripts import their sibling modules, as when run
    try:
        for name, extra in run_all.ACCELERATOR_QUICK.items():  # each script parses its form
            parsed = vars(_script(name).parse_args(extra))  # argparse exits on a bad flag
            for flag in (a for a in extra if a.startswith("--")):
                assert parsed[flag[2:].replace("-", "_")] not in (None, False), (name, flag)
    finally:
        sys.path.remove(str(BENCH))


def test_a_benchmark_without_markdown_shows_what_it_printed():
    run_all = _run_all()
    results = fake_results(0.5)
    bench = results["benchmarks"]["soups"]
    bench.update(
        tables=[], ratios=[], stdout_tail="cascade   alone s  casc. s\nr18 -> r50  0.076  0.054"
    )
    text = run_all.markdown(results)
    assert "```\ncascade   alone s  casc. s\nr18 -> r50  0.076  0.054\n```" in text
    bench.update(ratios=["uniform soup: 1.50× the loop"])  # a ratio line: no raw output
    assert "```" not in run_all.markdown(results)


def test_suite_compiles_attributes_each_compile_to_the_test_running():
    module = _script("suite_compiles")
    lines = [
        "Finished XLA compilation of jit(early) in 0.5 sec",
        "TEST tests/test_a.py::test_one[x]",
        "Finished XLA compilation of jit(step) in 1.25 sec",
        "Compiling jit(step) with global shapes and types ...",
        "TEST tests/test_b.py::test_two",
        "Finished XLA compilation of jit(step) in 2e-1 sec",
        "Finished XLA compilation of jit(add) in 0.05 sec",
    ]
    found = module.tally(lines)
    seconds, counts = found["seconds"], found["counts"]
    assert seconds["program"]["jit(step)"] == pytest.approx(1.45)
    assert counts["program"]["jit(step)"] == 2
    assert seconds["file"]["tests/test_b.py"] == pytest.approx(0.25)
    assert seconds["test"]["tests/test_a.py::test_one[x]"] == pytest.approx(1.25)
    assert seconds["file"]["(before the first test)"] == pytest.approx(0.5)
    assert sum(counts["file"].values()) == 4


def test_suite_compiles_knows_jax_own_single_ops_from_programs():
    module = _script("suite_compiles")
    own = module.jax_own_names()
    assert {"add", "_reduce_sum", "isfinite", "broadcast_in_dim", "_truncated_normal"} <= own
    assert not {"<lambda>", "_logme", "train_step", "step", "init"} & own


def test_the_block_names_the_cpu_the_figures_came_from():
    """CPUs of one architecture differ twofold in speed (docs/benchmarks.md): each run records
    its CPU, and the generated block names it (results recorded before that name none)."""
    from jaxmodels import host

    run_all = _run_all()
    assert run_all.provenance()["cpu"] == host.cpu_description()
    results = fake_results(1.0)
    results["meta"]["cpu"] = {"kind": "x86_64-AuthenticAMD-avx2", "model": "AMD EPYC"}
    assert "x86_64 (AMD EPYC, x86_64-AuthenticAMD-avx2), 2 cores" in run_all.markdown(results)
    assert "AMD EPYC" not in run_all.markdown(fake_results(1.0))
