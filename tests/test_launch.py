"""Real multi-process runs: `training.launch` starts 2 JAX processes × 4 CPU devices joined over
gloo, and what they compute equals one process with 8 devices (tests/conftest.py's).

One launch of tests/two_process_worker.py checks inference, an ensemble and a cascade, ranking
(in memory and --stream), fine-tuning (uninterrupted; killed while fully sharded, resumed
replicated), saving and loading, and three one-line errors; each test below reads one part of
it. Two cheap launches check the launcher itself and a process that cannot reach its coordinator.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

import jaxmodels
from jaxmodels import distributed
from scoring.hub import ranking as hub_ranking
from training import launch

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "two_process_worker.py"
sys.path.insert(0, str(REPO / "tests"))
import two_process_worker as worker  # noqa: E402
from session_folders import made_once  # noqa: E402

LAUNCH_TIMEOUT_S = 600  # a hang (a collective one process skipped) fails instead of blocking CI


def _task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4 learnable classes of 32×32 images: class k is bright in a channel-and-corner pattern."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = rng.integers(0, 90, (n, 32, 32, 3))
    images[labels == 0, :, :, 0] += 160
    images[labels == 1, :, :, 1] += 160
    images[labels == 2, :, :, 2] += 160
    images[labels == 3, :16, :16, :] += 160
    return images.astype(np.uint8), labels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    with made_once(tmp_path_factory, "launch-data") as (root, missing):
        if missing:
            for name, n, seed in (("train", 48, 0), ("eval", 20, 1)):  # 20: last batch padded
                images, labels = _task(n, seed)
                np.savez(root / f"{name}.npz", images=images, labels=labels)
            for name, seed in (("vit_a", 11), ("vit_b", 12)):
                ref = jaxmodels.parse_model_ref("vit_tiny")
                built = jaxmodels.build(ref, num_classes=4, init_seed=seed)
                jaxmodels.save(root / name, "vit_tiny", built.variables)
    return root


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory):
    """The worker's launch (once per session): its output, and what each process reported."""
    with made_once(tmp_path_factory, "two_processes") as (out, missing):
        if missing:
            status = launch.launch(
                [str(WORKER), str(out), str(data)], processes=2, devices_per_process=4,
                timeout_s=LAUNCH_TIMEOUT_S,
            )  # fmt: skip
            assert status == 0, f"the two-process worker failed with status {status}"
    reports = [json.loads((out / f"p{i}.json").read_text()) for i in range(2)]
    arrays = [dict(np.load(out / f"p{i}.npz")) for i in range(2)]
    return {"out": out, "reports": reports, "arrays": arrays}


def test_two_joined_processes_of_four_devices(two_processes):
    for i, report in enumerate(two_processes["reports"]):
        assert report["process_index"] == i and report["process_count"] == 2
        assert report["device_count"] == 8 and report["local_device_count"] == 4


def test_inference_outputs_in_input_order_equal_one_process(two_processes, data):
    reference = worker.inference_outputs(data)
    for arrays in two_processes["arrays"]:  # every process returns all rows
        for name, want in reference.items():
            # the same per-device programs on the same rows: identical bits
            np.testing.assert_array_equal(arrays[name], want, err_msg=name)
    assert reference["predict"].shape == (20, 4)


def test_ensemble_and_cascade_outputs_equal_one_process(two_processes, data):
    strategies = {r["ensemble_strategy"] for r in two_processes["reports"]}
    assert len(strategies) == 1  # "auto": every process runs the strategy process 0 measured
    _, reference = worker.committee_outputs(data, strategy=strategies.pop())
    exits = reference["cascade_exit_stage"]
    assert 0 < exits.sum() < len(exits)  # some rows answered at stage 0, some went on
    for arrays in two_processes["arrays"]:  # every process returns all rows
        for name, want in reference.items():
            # each device runs the same programs on the same rows as in one process
            np.testing.assert_array_equal(arrays[name], want, err_msg=name)


def _scores(path: pathlib.Path) -> dict:
    ranking = json.loads(path.read_text())
    return {m["model"]: m["scores"] for m in ranking["models"]}


def test_rank_scores_equal_one_process_in_memory_and_streamed(two_processes, data, tmp_path):
    out = two_processes["out"]
    assert all(r["rank"] == 0 and r["rank_stream"] == 0 for r in two_processes["reports"])
    models = worker.rank_models(data)[1:]
    train = str(data / "train.npz")
    for stream, folder, scores in (
        (False, "rank", worker.RANK_SCORES),
        (True, "stream", worker.STREAM_SCORES),
    ):
        want = hub_ranking.rank_hub(
            models, train, scores=scores, stream=stream, cache_dir=tmp_path / folder,
            log=lambda _: None,
        )  # fmt: skip
        assert want.error is None and want.scores == scores.split(",")
        got = _scores(out / folder / "ranking.json")
        assert set(got) == {"a", "b"} and set(got["a"]) == set(want.scores)
        for model in ("a", "b"):
            for name in want.scores:
                # in memory: features identical, scores bit-equal; streamed: the float32
                # running-QR statistics may combine the 8 devices' rows in another order
                # (gloo across processes vs one process) — float32 rounding at most
                np.testing.assert_allclose(
                    got[model][name], want.values[model][name], rtol=1e-6 if stream else 0,
                    err_msg=f"{folder} {model} {name}",
                )  # fmt: skip
    assert not (out / "rank" / "ranking.png").exists()  # no ground truth: no plot


def _weights(folder: pathlib.Path) -> dict:
    _, variables = jaxmodels.load(folder)
    return jaxmodels.models.paths.flatten(variables)


def _finetune(args: list[str]) -> int:
    return worker.script("finetune").main(args)


def test_finetuning_equals_one_process_and_a_killed_sharded_run_resumes_exactly(
    two_processes, data, tmp_path
):
    """2 processes: an uninterrupted run, and one killed after 5 steps fully sharded (checkpoints
    at step 2, at the epoch's end 3, and 4) then resumed replicated from step 4, mid-epoch; the killed copy resumed by 1 process of 8 devices; 1
    process uninterrupted."""
    out = two_processes["out"]
    for report in two_processes["reports"]:
        assert report["whole"] == report["killed"] == report["resumed"] == 0
    whole, resumed = _weights(out / "whole"), _weights(out / "resumed")
    assert set(whole) == set(resumed)
    for key in whole:
        # The killed run's sharded steps reduce-scatter one flat vector (training.flat_sharded),
        # the replicated ones all-reduce one (training.flat_reduce): the same sums in another
        # order, float32 rounding apart (AdamW turns the rounding of the zero-gradient key bias
        # into steps).
        atol = 3e-5 if key.endswith("key/bias") else 2e-6
        np.testing.assert_allclose(resumed[key], whole[key], rtol=2e-5, atol=atol, err_msg=key)

    common = [*worker.FINETUNE_ARGS, "--data", str(data / "train.npz"),
              "--eval-data", str(data / "eval.npz")]  # fmt: skip
    assert _finetune([*common, "--out", str(tmp_path / "one")]) == 0
    assert _finetune([*common, "--out", str(out / "killed")]) == 0
    one = _weights(tmp_path / "one")
    for name, got in (("2 processes", whole), ("resumed by 1 process", _weights(out / "killed"))):
        assert set(got) == set(one)
        for key in one:
            # Same global batches, same per-device programs; only the gradient all-reduce adds
            # the 8 devices' sums in another order (gloo across 2 processes vs within 1):
            # float32 rounding. AdamW divides each gradient by its own RMS, so where the exact
            # gradient is 0 — the attention key bias, to which softmax is invariant — the
            # rounding noise itself takes steps: those leaves hold noise of |x| ≈ 1e-5 and
            # agree only to that absolute size.
            atol = 3e-5 if key.endswith("key/bias") else 2e-6
            np.testing.assert_allclose(got[key], one[key], rtol=2e-5, atol=atol,
                                       err_msg=f"{name}: {key}")  # fmt: skip
    results = {name: json.loads((folder / "result.json").read_text())
               for name, folder in (("one", tmp_path / "one"), ("whole", out / "whole"),
                                    ("resumed", out / "resumed"), ("killed", out / "killed"))}  # fmt: skip
    assert results["one"]["resumed_from"] is results["whole"]["resumed_from"] is None
    for name in ("whole", "resumed", "killed"):
        assert results[name]["finished"] and results[name]["steps"] == 6
        assert results[name]["final_eval"]["count"] == 20
        np.testing.assert_allclose(
            results[name]["final_eval"]["loss"], results["one"]["final_eval"]["loss"], rtol=1e-4
        )
    assert results["resumed"]["resumed_from"] == results["killed"]["resumed_from"] == 4
    # the same evaluations, within float32 rounding (the sharded steps reduce-scatter)
    for got, want in zip(results["resumed"]["evals"], results["whole"]["evals"], strict=True):
        assert {**got, "loss": 0} == {**want, "loss": 0}
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    # the checkpoints the 2 processes wrote: 2, 3, 4 while sharded, 6 replicated (2 kept)
    assert sorted(os.listdir(out / "resumed" / "checkpoints")) == ["4", "6"]
    # process 0 wrote the JSON and released the lock; every process read the weights back
    digests = {r["loaded_sha256"] for r in two_processes["reports"]}
    assert digests == {jaxmodels.models.paths.tree_digest(jaxmodels.load(out / "resumed")[1])}
    assert [p.parent.name for p in out.glob("*/lock")] == ["locked"]
    assert not [p for p in out.rglob("*.tmp")]


def test_cluster_errors_are_one_line_on_every_process(two_processes):
    out = two_processes["out"]
    expected = {
        "batch_not_divisible": "batch size 12 must be a multiple of the 8 devices (try 8 or 16)",
        "different_arguments": "process 1 was started with other arguments than process 0",
        "locked": f"{out / 'locked'} is in use by ",
    }
    for report in two_processes["reports"]:
        for case, text in expected.items():
            status, message = report[case]
            assert status == 2 and len(message.strip().splitlines()) == 1, (case, message)
            assert message.startswith("hubtune tune: error: ") and text in message, (case, message)
    first, second = (r["locked"][1] for r in two_processes["reports"])
    assert "in use by pid" in first and "process 0 could not lock it" in second
    assert not (out / "batch").exists() and not (out / "mismatch").exists()
    assert sorted(os.listdir(out / "locked")) == ["lock"]  # nothing written, lock untouched


def test_launcher_relays_prefixed_output_and_stops_the_others_when_one_fails(capfd):
    code = (
        "import os, sys, time\n"
        "i = int(os.environ['HUBTUNE_PROCESS_ID'])\n"
        "print('devices', os.environ['JAX_NUM_CPU_DEVICES'], 'at', os.environ['JAX_COORDINATOR_ADDRESS'])\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(3) if i == 1 else time.sleep(120)\n"
    )
    start = time.perf_counter()
    status = launch.launch(["-c", code], processes=2, devices_per_process=3)
    seconds = time.perf_counter() - start
    captured = capfd.readouterr()
    assert status == 3 and seconds < 60  # process 0 was stopped, not waited for
    for i in (0, 1):
        assert any(line.startswith(f"[p{i}] devices 3 at localhost:") for line in
                   captured.out.splitlines())  # fmt: skip
        assert f"[p{i}] to stderr" in captured.err
    assert "[launch] process 1 exited with status 3; stopping the others" in captured.err


def test_a_hung_launch_is_stopped_at_its_timeout(capfd):
    start = time.perf_counter()
    status = launch.launch(["-c", "import time; time.sleep(120)"], 2, 1, timeout_s=1)
    assert status == launch.TIMEOUT_EXIT_CODE and time.perf_counter() - start < 30
    assert "[launch] still running after 1 s; stopping every process" in capfd.readouterr().err


def test_one_process_launch_is_a_plain_run_on_fake_devices(capfd):
    code = "import jax; print(jax.process_count(), jax.device_count())"
    cli = subprocess.run(
        [sys.executable, "-m", "training.launch", "--processes", "1", "--devices-per-process",
         "3", "--", "-c", code],
        cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.splitlines() == ["[p0] 1 3"]


def test_a_process_that_cannot_reach_the_coordinator_fails_in_one_line_naming_it():
    port = launch.free_port()
    env = {
        **launch.child_env(1, 2, 1, port),
        "PYTHONPATH": str(REPO),
        distributed.TIMEOUT_ENV: "3",
    }
    start = time.perf_counter()
    child = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "finetune.py"), "--model", "vit_tiny",
         "--data", "unused.npz", "--out", "unused"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )  # fmt: skip
    assert child.returncode == distributed.DISTRIBUTED_EXIT_CODE
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1, child.stderr
    assert f"localhost:{port}" in lines[0] and "process 1 could not join" in lines[0]
    assert time.perf_counter() - start < 60
    assert not os.path.exists(REPO / "unused")
