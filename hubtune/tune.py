"""Fine-tune a jaxmodels classifier: full, linear probe, BitFit or SSF — one run or a sweep.

Run `hubtune tune --help` for the options and examples.
"""

import argparse
import json
import logging
import sys

import jax

from hubtune import output
from hubtune.parsing import Parser, add_distributed_option, interruptible
from jaxmodels import ModelRefError, distributed
from jaxmodels.data.sources import DataError
from training import loop, sweep
from training import run as run_lib
from training.config import AUGMENTATIONS, RunConfig, RunError

PROG = "hubtune tune"  # in usage lines, errors and warnings, also as scripts/*.py

EXAMPLES = """
examples:
  # SSF on CIFAR-10 from an imported ViT-S/16 checkpoint (TFDS data prepared beforehand)
  hubtune tune --model vit_s16=weights/vit_s16.safetensors \\
      --data tfds:cifar10 --eval-data tfds:cifar10:test --mode ssf --epochs 10 --out runs/ssf

  # linear probe on an image folder (one sub-folder per class), evaluation on another folder
  hubtune tune --model resnet50=weights/resnet50.safetensors \\
      --data data/train --eval-data data/val --mode linear --lr 0.01 --out runs/probe

  # a sweep (the ingredients of a model soup): 2 x 2 x 2 = 8 runs, one folder each
  hubtune tune --model vit_s16=weights/vit_s16.safetensors --data tfds:cifar10 \\
      --eval-data tfds:cifar10:test --mode full --lr 1e-5,3e-5 --seed 0,1 \\
      --augmentation light,strong --label-smoothing 0.1 --out runs/soup

what you get in --out (for a sweep: in --out/<lr=..._seed=..._aug=..._ls=...>/, plus
--out/sweep.json listing every run):
  config.json    the run's settings (a later command on this folder must match them)
  checkpoints/   resumable train state + data position; run the same command again to resume
                 a killed run (an unreadable latest checkpoint is moved aside, the previous used)
  model/         final weights, for jaxmodels.load(path) or training.load_run(run folder) (SSF
                 is folded away: the plain model at plain speed; EMA weights when --ema is on)
  metrics.jsonl  one JSON object per logged step / evaluation, each step once
  result.json    config, every evaluation, trainable parameter count, time (paths relative to
                 the run folder)
  A finished run is never retrained or rewritten: the same command prints its stored result.
  One command per folder at a time (a lock file); every check happens before anything trains,
  and a user error is one line with exit status 2.

seeds: --seed drives data order, augmentation, dropout and mixup/cutmix; --init-seed drives
  every fresh parameter (a new head, SSF, a random init). A sweep keeps --init-seed fixed, so
  its runs start from one point: the ingredients of a model soup. For soups, start every
  ingredient from one linear-probe run: --model NAME=LP_RUN/model (its head is kept).

modes:
  full    every parameter                      linear  the classifier head only
  bitfit  all biases + head (Ben Zaken 2022)   ssf     SSF scale/shift + head (Lian 2022)

data: tfds:NAME[:SPLIT] (read with tfds.data_source, needs the dataset already prepared in
  --tfds-data-dir as ArrayRecord; no TensorFlow), a .npz with 'images' [N,H,W,C] uint8 and
  'labels' [N], or a folder with one sub-folder per class. Images are prepared with the model's
  own normalisation and resize (jaxmodels.spec); training adds random-resized-crop + flip.

devices: the batch is split over every visible device (data parallel); --batch-size is the
  global batch and must be divisible by the device count. --shard-params splits parameters,
  gradients and optimizer state over the devices too (each holds about 1/n). On several hosts
  (a TPU VM pod slice, a SLURM job), start the same command on every host with --distributed
  (jax.distributed.initialize() with JAX's cluster detection); each host then reads only its
  share of every batch, and process 0 writes the JSON files (docs/multihost.md). On one
  machine, python -m training.launch --processes 2 --devices-per-process 4 -- scripts/finetune.py
  ... runs the same multi-process program on CPU devices.
"""


def _comma_separated(convert, what: str):
    """An argparse type: "a,b,c" → [convert(a), convert(b), convert(c)], else one-line error."""

    def parse(text: str) -> list:
        try:
            return [convert(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}; got {text!r}"
            ) from None

    return parse


_floats = _comma_separated(float, "numbers")
_ints = _comma_separated(int, "integers")


def _words(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(
        prog=PROG,
        description=(
            "Fine-tune an image classifier from jaxmodels on your data with one of four "
            "methods (full, linear, bitfit, ssf). Comma-separated values for --lr, --seed, "
            "--augmentation or --label-smoothing turn the command into a sweep that runs "
            "every combination, one output folder per run."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="NAME (random init) or NAME=CHECKPOINT (.safetensors, .npz or a "
        "jaxmodels.save folder), NAME e.g. vit_s16, resnet50",
    )
    parser.add_argument("--data", required=True, help="training data (see 'data:' below)")
    parser.add_argument(
        "--eval-data", help="evaluated every --eval-every epochs and at the end (optional)"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=1,
        metavar="EPOCHS",
        help="epochs between evaluations of --eval-data (default 1; always one at the end)",
    )
    parser.add_argument("--out", required=True, help="output folder (created; resumed if present)")
    parser.add_argument(
        "--mode",
        default="ssf",
        choices=["full", "linear", "bitfit", "ssf"],
        help="which parameters are trained (default: ssf)",
    )
    parser.add_argument("--epochs", type=int, default=10, help="passes over the data (default 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    parser.add_argument(
        "--lr",
        type=_floats,
        default=[1e-3],
        help="peak learning rate(s), comma-separated for a sweep (default 1e-3)",
    )
    parser.add_argument(
        "--seed",
        type=_ints,
        default=[0],
        help="data/augmentation seed(s): order, crops, flips, mixup (default 0)",
    )
    parser.add_argument(
        "--init-seed",
        type=int,
        default=0,
        help="seed of every fresh parameter (new head, SSF); shared by a sweep (default 0)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        help="head size (default: the training data's class count)",
    )
    parser.add_argument(
        "--augmentation",
        type=_words,
        default=["light"],
        help=f"preset(s) among {sorted(AUGMENTATIONS)}: none = centre "
        "crop; light = crop 35-100%% + flip; strong = crop 8-100%% + flip + "
        "mixup 0.8 / cutmix 1.0 (default light)",
    )
    parser.add_argument(
        "--label-smoothing",
        type=_floats,
        default=[0.0],
        help="label smoothing epsilon(s) (default 0)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=0.05,
        help="AdamW decoupled weight decay; never applied to biases, norms, SSF (default 0.05)",
    )
    parser.add_argument(
        "--warmup-epochs",
        type=float,
        default=1.0,
        help="linear warmup before the cosine decay (default 1)",
    )
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=1.0,
        help="global gradient-norm clip, 0 = off (default 1)",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=None,
        help="EMA decay of the weights, e.g. 0.999; the EMA is evaluated/saved",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="compute in bfloat16 (weights and optimizer stay float32)",
    )
    parser.add_argument("--image-size", type=int, help="input side (default: the model's)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="steps between checkpoints (default 500; always one at the end)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        metavar="N",
        help="keep the newest N checkpoints (default 2); 0 keeps every one, the trajectory "
        "that 'hubtune soup --trajectory' averages",
    )
    parser.add_argument("--tfds-data-dir", help="TFDS data directory")
    parser.add_argument("--num-workers", type=int, default=4, help="image-loading threads")
    parser.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many steps (smoke tests); the run stays unfinished",
    )
    parser.add_argument(
        "--shard-params",
        action="store_true",
        help="shard parameters, gradients and optimizer state over the devices (FSDP) instead "
        "of replicating them: for models that do not fit one device",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_distributed_option(parser)
    return parser.parse_args(argv)


@interruptible(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    # orbax and absl log every retry of a broken checkpoint; hubtune reports them in one line
    logging.getLogger("absl").setLevel(logging.ERROR)
    distributed.initialize(args.distributed)
    try:
        distributed.check_same_config(vars(args), "arguments")
        output.check(args.out, "tune", None)  # never into another tool's folder
        if args.keep_checkpoints < 0:
            raise RunError(f"--keep-checkpoints must be ≥ 0 (0: all); got {args.keep_checkpoints}")
        base = RunConfig(
            model=args.model,
            train_data=args.data,
            eval_data=args.eval_data,
            out_dir=args.out,
            mode=args.mode,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr[0],
            weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs,
            clip_norm=args.clip_norm or None,
            label_smoothing=args.label_smoothing[0],
            augmentation=args.augmentation[0],
            ema_decay=args.ema,
            bf16=args.bf16,
            image_size=args.image_size,
            num_classes=args.num_classes,
            seed=args.seed[0],
            init_seed=args.init_seed,
            checkpoint_every=args.checkpoint_every,
            eval_every=args.eval_every,
            keep_checkpoints=args.keep_checkpoints or None,
            tfds_data_dir=args.tfds_data_dir,
            num_workers=args.num_workers,
            stop_after_steps=args.max_steps,
            shard_params=args.shard_params,
        )
        grid = {
            "lr": args.lr,
            "seed": args.seed,
            "augmentation": args.augmentation,
            "label_smoothing": args.label_smoothing,
        }
        grid = {k: v for k, v in grid.items() if len(v) > 1}
        progress = not args.no_progress
        if not grid:
            plan = run_lib.plan(base)
            if plan.finished:
                print(f"{args.out}: finished before — nothing retrained; its stored result:")
            results = [run_lib.run(plan, progress=progress)]
            folders = [args.out]
        else:
            configs = sweep.expand_grid(base, grid)
            results = sweep.run_sweep(configs, grid, args.out, progress=progress)
            folders = [c.out_dir for c in configs]
    except (RunError, DataError, ModelRefError, distributed.DistributedError,
            output.OutputError) as err:  # fmt: skip
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except loop.Interrupted as stop:
        saved = "saved a checkpoint there" if stop.saved else "the newest checkpoint is earlier"
        print(
            f"{PROG}: interrupted at step {stop.step} ({saved}); the same command resumes "
            "the run from its newest checkpoint",
            file=sys.stderr,
        )
        return 130
    if jax.process_index() == 0:
        output.mark(args.out, "tune", None, complete=all(r["finished"] for r in results))
        for folder, result in zip(folders, results, strict=True):
            final = result.get("final_eval") or {}
            print(
                json.dumps(
                    {
                        "out_dir": folder,
                        "finished": result["finished"],
                        "steps": result["steps"],
                        "accuracy": final.get("accuracy"),
                        "trainable_params": result["trainable_params"],
                    }
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
