"""Rank pre-trained models for a target dataset with LogME and its peers, without fine-tuning.

Usage:
    python scripts/rank.py --models MODEL_SPEC... --data DATA_SPEC [--ground-truth accs.json]
                           [--scores logme,leep,...] [--stream] --out DIR

MODEL_SPEC: `name=checkpoint` (a .safetensors torchvision/timm state dict, a vision_transformer
    .npz, or an orbax directory written by `jaxmodels.save`; anything `jaxmodels.load` reads) or a
    bare `name` (random initialisation, for trying things out). Names: see `jaxmodels.MODEL_NAMES`.
DATA_SPEC: `data.npz` with `images` [N, H, W, 3] (0–255) and integer `labels` [N]; a folder with
    one sub-folder of images per class; or `tfds:NAME:SPLIT` (e.g. tfds:cifar100:train[:5000],
    already prepared as ArrayRecord under TFDS's data_dir).

Each model's features (and head logits, for LEEP/NCE) are extracted once over all devices and
cached under --cache-dir, keyed by the checkpoint's content hash and the data, so re-ranking with
other scores is instant. Prints a table (model, each score with the model's rank) and writes
DIR/ranking.json; with --ground-truth (a JSON object {model: fine-tuned accuracy}) it also prints
each score's weighted Kendall τ, Kendall τ, Spearman ρ and top-1 regret and draws DIR/ranking.png.
--stream never holds the features: statistics are summed inside the extraction step (LogME,
H-score, LEEP, NCE only). Bad specs print one line and exit with status 2.

Example:
    python scripts/rank.py --models resnet_tiny vit_tiny --data tiny.npz --scores logme,hscore \\
        --out runs/rank
"""

import argparse
import sys

from scoring import hub_ranking
from scoring.hub_data import DataSpecError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", required=True, metavar="MODEL_SPEC")
    parser.add_argument("--data", required=True, metavar="DATA_SPEC")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--scores",
        default=",".join(hub_ranking.DEFAULT_SCORES),
        help=f"comma-separated, from {', '.join(hub_ranking.SCORES)} (default: %(default)s)",
    )
    parser.add_argument("--ground-truth", metavar="JSON", help="{model: fine-tuned accuracy}")
    parser.add_argument("--stream", action="store_true", help="score from streamed statistics")
    parser.add_argument("--cache-dir", default=".cache/hubtune_features")
    parser.add_argument("--batch-size", type=int, help="global batch (default 32 per device)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random-init models")
    args = parser.parse_args(argv)
    try:
        ranking = hub_ranking.rank_hub(
            args.models,
            args.data,
            scores=args.scores,
            ground_truth=args.ground_truth,
            cache_dir=args.cache_dir,
            batch_size=args.batch_size,
            stream=args.stream,
            seed=args.seed,
        )
    except (hub_ranking.SpecError, DataSpecError) as err:
        print(f"rank.py: error: {err}", file=sys.stderr)
        return 2
    print()
    print(hub_ranking.format_table(ranking))
    for path in hub_ranking.write_outputs(ranking, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
