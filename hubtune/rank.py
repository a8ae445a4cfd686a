"""Rank pre-trained models for a target dataset with LogME and its peers, without fine-tuning.

Usage:
    hubtune rank --models MODEL... --data DATA_SPEC [--ground-truth accs.json | RUN...]
                           [--scores logme,leep,...] [--stream] --out DIR

MODEL: `[LABEL:]NAME=CHECKPOINT` (a .safetensors torchvision/timm state dict, a vision_transformer
    or big_vision .npz, or a folder written by `jaxmodels.save`), a fine-tuning run folder (the
    architecture is read from it), or a bare `NAME` (a random initialisation, for trying things
    out). LABEL is the short name used in the table, ranking.json and ranking.png; by default the
    run folder's name, the checkpoint file's stem, or NAME. Names: {names}.
DATA_SPEC: `data.npz` with `images` [N, H, W(, 3)] (uint8, or float with a stated `value_range`)
    and integer `labels` [N] (0..C−1, every class present); a folder with one sub-folder of images
    per class; or `tfds:NAME[:SPLIT]` (e.g. tfds:cifar100:train[:5000], already prepared as
    ArrayRecord under --tfds-data-dir; nothing is downloaded).

Everything cheap is checked before the first extraction: every checkpoint's header opens, the
labels, each score's needs (e.g. N-LEEP's samples per mixture component), --out. Each model's
features (and head logits, for LEEP/NCE) are extracted once over all devices, with the model's own
evaluation preprocessing, and cached under --cache-dir (default {cache}), keyed by the weights'
content hash and the data, so re-ranking with other scores compiles and extracts nothing. Prints a
table (model, each score with the model's rank) and writes DIR/ranking.json; with --ground-truth
(a JSON object {{label or name: fine-tuned accuracy}}) it also prints each score's weighted Kendall
τ, Kendall τ, Spearman ρ and top-1 regret and draws DIR/ranking.png. --stream never holds the
features: statistics are summed inside the extraction step (LogME, H-score, LEEP, NCE; those are
the default scores then). A user error prints one line and exits with status 2; a score that
fails keeps the scores that finished in ranking.json.

Several hosts (a TPU VM pod slice, a SLURM job): start the same command on every host with
--distributed; each host extracts its share of every batch and process 0 writes DIR. On one
machine, `python -m training.launch --processes 2 --devices-per-process 4 -- scripts/rank.py ...`
runs it as two processes of four CPU devices (docs/multihost.md).

Example:
    hubtune rank --models resnet_tiny vit_tiny --data tiny.npz --scores logme,hscore \\
        --out runs/rank
"""

import json
import pathlib
import sys

import jax

import jaxmodels
from hubtune import output
from hubtune.parsing import Parser, add_distributed_option, interruptible
from jaxmodels import distributed
from scoring.hub import ranking as hub_ranking
from scoring.hub.features import default_cache_dir
from training import run_folder
from training.config import RunError

PROG = "hubtune rank"  # in usage lines, errors and warnings, also as scripts/*.py

USER_ERRORS = (
    hub_ranking.SpecError,
    jaxmodels.DataError,
    jaxmodels.ModelRefError,
    distributed.DistributedError,
    RunError,
)
GROUND_TRUTH_JSON = "ground_truth.json"


@interruptible(PROG)
def main(argv=None) -> int:
    doc = __doc__.format(names=", ".join(jaxmodels.MODEL_NAMES), cache=default_cache_dir())
    parser = Parser.from_doc(PROG, doc)
    parser.add_argument("--models", nargs="+", required=True, metavar="MODEL")
    parser.add_argument("--data", required=True, metavar="DATA_SPEC")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--scores",
        help=f"comma-separated, from {', '.join(hub_ranking.SCORES)} (default: "
        f"{','.join(hub_ranking.DEFAULT_SCORES)}; with --stream: "
        f"{','.join(hub_ranking.STREAM_SCORES)})",
    )
    parser.add_argument(
        "--ground-truth",
        nargs="+",
        metavar="JSON|RUN",
        help="a JSON file {model: fine-tuned accuracy}, or the run/sweep folders of `hubtune "
        "tune` runs started from these models (each model's best run counts; the table is "
        "written to DIR/ground_truth.json)",
    )
    parser.add_argument("--stream", action="store_true", help="score from streamed statistics")
    parser.add_argument(
        "--cache-dir", help=f"feature cache (default {default_cache_dir()}, or $HUBTUNE_CACHE)"
    )
    parser.add_argument("--batch-size", type=int, help="global batch (default 32 per device)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random-init models")
    parser.add_argument("--tfds-data-dir", help="TFDS data directory")
    add_distributed_option(parser)
    args = parser.parse_args(argv)
    distributed.initialize(args.distributed)

    def fail(message: str) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2

    out = pathlib.Path(args.out)
    lead = jax.process_index() == 0  # one table, one writer
    settings = output.settings_of(
        args, ignore=("cache_dir", "distributed", "tfds_data_dir", "batch_size")
    )
    try:
        stored = output.check(out, "rank", settings)
    except output.OutputError as err:
        return fail(str(err))
    if stored is not None:
        if lead:
            print(f"{out}: ranked before with these settings; nothing recomputed. Stored result:")
            print((out / "ranking.json").read_text())
        return 0
    try:
        distributed.check_same_config(vars(args), "arguments")
        ground_truth = args.ground_truth
        if ground_truth is not None:
            if len(ground_truth) == 1 and pathlib.Path(ground_truth[0]).is_file():
                ground_truth = ground_truth[0]
            else:  # run folders: their best accuracies, written beside the ranking
                ground_truth = run_folder.ground_truth(ground_truth)
        ranking = hub_ranking.rank_hub(
            args.models,
            args.data,
            scores=args.scores,
            ground_truth=ground_truth,
            cache_dir=args.cache_dir,
            batch_size=args.batch_size,
            stream=args.stream,
            seed=args.seed,
            data_dir=args.tfds_data_dir,
            log=print if lead else lambda _: None,
        )
    except USER_ERRORS as err:
        return fail(str(err))
    if lead:
        print()
        print(hub_ranking.format_table(ranking))
        for path in hub_ranking.write_outputs(ranking, out):
            print(f"wrote {path}")
        if isinstance(ground_truth, dict):
            path = out / GROUND_TRUTH_JSON
            path.write_text(json.dumps(ground_truth, indent=2, sort_keys=True) + "\n")
            print(f"wrote {path}")
        output.mark(out, "rank", settings, complete=ranking.error is None)
    if ranking.error:
        return fail(f"{ranking.error} (the scores that finished are in {out / 'ranking.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
