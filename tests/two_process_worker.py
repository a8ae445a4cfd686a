"""What tests/test_launch.py runs as 2 processes × 4 CPU devices under `training.launch`.

One launch checks many things, because starting JAX processes and compiling are the slow parts:
inference outputs, an ensemble and an adaptive cascade, both ranking modes, fine-tuning (an
uninterrupted run; a run killed while fully sharded and resumed replicated), and the one-line
errors a cluster user meets. Compiled programs are cached on disk (OUT/xla-cache), so the resumed
run reuses the uninterrupted one's. Every process writes what it saw to OUT/p<i>.json and
OUT/p<i>.npz; the test compares them with one process of 8 devices.

Usage: python tests/two_process_worker.py OUT DATA   (DATA holds train.npz, eval.npz, vit_b/)
"""

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import shutil
import socket
import sys
import time

START = time.perf_counter()
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import jaxmodels  # noqa: E402
from jaxmodels import distributed  # noqa: E402
from jaxmodels.committees import rules  # noqa: E402

INFERENCE_BATCH = 16
FINETUNE_ARGS = [
    "--model", "vit_tiny", "--mode", "full", "--num-classes", "4", "--epochs", "2",
    "--batch-size", "16", "--lr", "0.003", "--warmup-epochs", "0.5", "--augmentation", "light",
    "--checkpoint-every", "2", "--num-workers", "0", "--no-progress",
]  # fmt: skip
RANK_SCORES = "logme,hscore,leep,nce"
STREAM_SCORES = "logme,hscore,nce"  # one streamed pass (LEEP would take a second)


def rank_models(data: pathlib.Path) -> list[str]:
    """Two saved checkpoints of one architecture (read back by every process; one compile)."""
    return ["--models", f"a:vit_tiny={data / 'vit_a'}", f"b:vit_tiny={data / 'vit_b'}"]


def script(name: str):
    """The command-line tool behind ``scripts/NAME.py``."""
    modules = {
        "rank": "hubtune.rank",
        "finetune": "hubtune.tune",
        "cascade": "hubtune.serve.cli",
        "soup": "hubtune.soup.cli",
    }
    return importlib.import_module(modules[name])


def run_quietly(main, args: list[str]) -> tuple[int, str]:
    """(exit status, what it printed on stderr) of a script's main."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(args)
    return status, err.getvalue()


def inference_outputs(data: pathlib.Path) -> dict:
    """predict and extract_features of a seeded vit_tiny, streamed from the source and on a
    device-resident prepared set (each process uploads its slice of every batch), and that
    set's `evaluate` (the path of every fine-tuning evaluation)."""
    built = jaxmodels.build(jaxmodels.parse_model_ref("vit_tiny"), num_classes=4, init_seed=3)
    model, variables = built.model, built.variables
    source = jaxmodels.open_source(str(data / "eval.npz"))
    feats, logits = jaxmodels.extract_features(
        model, variables, source, batch_size=INFERENCE_BATCH, return_logits=True, progress=False
    )
    predicted = jaxmodels.predict(
        model, variables, source, batch_size=INFERENCE_BATCH, progress=False
    )
    prepared = jaxmodels.prepare(
        source, jaxmodels.spec_of(model).preprocessing, batch_size=INFERENCE_BATCH,
        placement="device", progress=False,
    )  # fmt: skip
    result = jaxmodels.evaluate(model, variables, prepared)
    return {
        "predict": predicted, "features": feats, "feature_logits": logits,
        "prepared_predict": jaxmodels.predict(model, variables, prepared),
        "prepared_features": jaxmodels.extract_features(model, variables, prepared),
        "prepared_evaluate": np.array([result.accuracy, result.loss, result.count]),
    }  # fmt: skip


def committee_outputs(data: pathlib.Path, strategy: str = "auto") -> tuple[dict, dict]:
    """(facts, arrays): an ensemble of two seeded vit_tiny members and an adaptive cascade of
    them over eval.npz's 20 images (every process passes all rows and gets all outputs). The
    cascade's threshold is the median of stage 0's confidences, so about half the rows go on."""
    members = []
    for seed in (5, 6):
        ref = jaxmodels.parse_model_ref("vit_tiny")
        built = jaxmodels.build(ref, num_classes=4, init_seed=seed)
        rng = np.random.default_rng(seed)  # a random head: a fresh one is zeros, logits all 0
        params = dict(built.variables["params"])
        params["head"] = jax.tree.map(
            lambda x, rng=rng: rng.standard_normal(x.shape).astype(np.float32), params["head"]
        )
        spec = jaxmodels.spec_of(built.model)
        variables = {**built.variables, "params": params}
        members.append(jaxmodels.Member(
            built.model, variables, spec.flops_per_image, spec.preprocessing, f"vit{seed}"
        ))  # fmt: skip
    images = np.load(data / "eval.npz")["images"]
    ensemble = jaxmodels.Ensemble(members, batch_size=8, strategy=strategy)
    member_logits = ensemble.member_logits(images)
    # stage 0's confidence as the cascade computes it (rule "ensemble", max_prob)
    confidence = np.asarray(rules.stage_confidence(member_logits[0], rules.max_prob))
    cascade = jaxmodels.Cascade(members, [float(np.median(confidence))], batch_size=8)
    answered = cascade.run(images)
    arrays = {
        "ensemble_logits": ensemble.logits(images),
        "member_logits": member_logits,
        "cascade_logits": answered.logits,
        "cascade_exit_stage": answered.exit_stage,
    }
    return {"ensemble_strategy": ensemble.chosen_strategy}, arrays


def main(out: pathlib.Path, data: pathlib.Path) -> None:
    index = jax.process_index()
    report = {
        "seconds": {"imported": time.perf_counter() - START},
        "process_index": index,
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
    }
    finetune, rank = script("finetune"), script("rank")
    train, evaluation = str(data / "train.npz"), str(data / "eval.npz")
    common = [*FINETUNE_ARGS, "--data", train, "--eval-data", evaluation]

    # the one-line errors first: each fails before any heavy work
    report["batch_not_divisible"] = run_quietly(
        finetune.main, [*common, "--batch-size", "12", "--out", str(out / "batch")]
    )
    report["different_arguments"] = run_quietly(
        finetune.main, [*common, "--seed", str(index), "--out", str(out / "mismatch")]
    )
    locked = out / "locked"
    if index == 0:  # a live process (the launcher) holds this folder
        locked.mkdir()
        holder = {"host": socket.gethostname(), "pid": os.getppid(), "started": "test"}
        (locked / "lock").write_text(json.dumps(holder))
    multihost_utils.sync_global_devices("lock written")
    report["locked"] = run_quietly(finetune.main, [*common, "--out", str(locked)])

    report["seconds"]["errors"] = time.perf_counter() - START
    arrays = inference_outputs(data)
    report["seconds"]["inference"] = time.perf_counter() - START
    facts, committee = committee_outputs(data)
    report.update(facts)
    arrays.update(committee)
    report["seconds"]["committees"] = time.perf_counter() - START

    rank_args = [*rank_models(data), "--data", train, "--cache-dir", str(out / "cache")]
    report["rank"] = rank.main([*rank_args, "--scores", RANK_SCORES, "--out", str(out / "rank")])
    report["rank_stream"] = rank.main(
        [*rank_args, "--stream", "--scores", STREAM_SCORES, "--out", str(out / "stream")]
    )

    report["seconds"]["rank"] = time.perf_counter() - START
    report["whole"] = finetune.main([*common, "--out", str(out / "whole")])
    report["seconds"]["whole"] = time.perf_counter() - START
    report["killed"] = finetune.main(
        [*common, "--shard-params", "--max-steps", "5", "--out", str(out / "resumed")]
    )
    if index == 0:  # kept for the test to resume with one process
        shutil.copytree(out / "resumed", out / "killed")
    multihost_utils.sync_global_devices("killed run copied")
    report["seconds"]["killed"] = time.perf_counter() - START
    report["resumed"] = finetune.main([*common, "--out", str(out / "resumed")])

    # every process reads the saved weights back (orbax restores into NumPy, not global arrays)
    _, variables = jaxmodels.load(out / "resumed")
    report["loaded_sha256"] = jaxmodels.models.paths.tree_digest(variables)
    report["seconds"]["done"] = time.perf_counter() - START
    np.savez(out / f"p{index}.npz", **arrays)
    (out / f"p{index}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":  # (the test imports this file for its helpers: no side effects)
    distributed.initialize()  # before any array exists
    jax.config.update("jax_compilation_cache_dir", os.path.join(sys.argv[1], "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
