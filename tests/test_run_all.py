"""The benchmark runner: it knows every benchmark, and its docs block flags loaded runs."""

import importlib.util
import json
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "benchmarks"


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", BENCH / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.parametrize("load, flagged", [(1.5, False), (2.5, True)])
def test_the_docs_block_carries_command_commit_and_load(tmp_path, load, flagged):
    run_all = _run_all()
    docs = tmp_path / "b.md"
    docs.write_text(f"# B\n\nprose\n\n{run_all.START}\nold\n{run_all.END}\n\nafter\n")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(fake_results(load)))
    assert run_all.main(["--tables", str(results), "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert text.startswith("# B\n\nprose\n") and text.endswith("after\n") and "old" not in text
    assert "python scripts/benchmarks/soups.py --quick" in text and "abc1234" in text
    assert "| 1 | 2 |" in text and "- uniform soup: 1.50× the loop" in text
    assert ("measured under load" in text) == flagged


def test_a_failed_benchmark_is_shown_as_failed(tmp_path):
    run_all = _run_all()
    text = run_all.markdown(fake_results(0.5, returncode=3))
    assert "**Failed** (exit 3)" in text and "boom" in text
