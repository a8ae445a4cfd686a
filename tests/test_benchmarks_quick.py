"""The benchmark scripts' `--quick` forms run, and their built-in agreement checks pass.

Each script checks float32 against float64 (and LogME against a NumPy reference, streamed against
in-memory statistics) and exits non-zero when a difference exceeds 1e-3; here they run as a user
would, in a subprocess, on the CPU.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def run_script(name, tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmarks" / f"{name}.py"),
            "--quick",
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists()
    return proc.stdout


def test_bench_logme_quick_agrees_in_float32(tmp_path):
    stdout = run_script("logme", tmp_path, "--repeats", "1")
    assert "| 2000 | 256 | 10 |" in stdout
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("float32 vs float64 LogME")]
    assert line.endswith(": OK"), line


def test_bench_scores_quick_agrees_in_float32(tmp_path):
    stdout = run_script("scores", tmp_path, "--repeats", "1")
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("float32 vs float64 agreement")]
    assert line.endswith(": OK"), line
    assert "overhead" in stdout


def test_bench_scale_quick_memory_part_checks_itself(tmp_path):
    """ViT-B/16 full fine-tuning on 8 fake devices, from abstract arrays (never materialised)."""
    import json

    run_script("scale", tmp_path, "--skip-steps")
    memory = json.loads((tmp_path / "scale.json").read_text())["memory"]
    assert memory["model"] == "vit_b16" and memory["devices"] == 8
    replicated = memory["replicated"]["params_and_optimizer_bytes_per_device"]
    # ViT-B/16 with 10 classes: 86.2 M float32 parameters, twice that in AdamW moments
    assert 3 * 4 * 85.0e6 < replicated < 3 * 4 * 86.5e6
    assert 0.125 <= memory["sharded_over_replicated"] < 0.127
