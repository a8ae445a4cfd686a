"""Fine-tune a jaxmodels classifier: full, linear probe, BitFit or SSF — one run or a sweep.

Run `python scripts/finetune.py --help` for the options and examples.
"""

import argparse
import json
import sys

import jax

from training import run as run_lib
from training import sweep

EXAMPLES = """
examples:
  # SSF on CIFAR-10 from an imported ViT-S/16 checkpoint (TFDS data prepared beforehand)
  python scripts/finetune.py --model vit_s16=weights/vit_s16.safetensors \\
      --data tfds:cifar10 --eval-data tfds:cifar10:test --mode ssf --epochs 10 --out runs/ssf

  # linear probe on an image folder (one sub-folder per class), evaluation on another folder
  python scripts/finetune.py --model resnet50=weights/resnet50.safetensors \\
      --data data/train --eval-data data/val --mode linear --lr 0.01 --out runs/probe

  # a sweep (the ingredients of a model soup): 2 x 2 x 2 = 8 runs, one folder each
  python scripts/finetune.py --model vit_s16=weights/vit_s16.safetensors --data tfds:cifar10 \\
      --eval-data tfds:cifar10:test --mode full --lr 1e-5,3e-5 --seed 0,1 \\
      --augmentation light,strong --label-smoothing 0.1 --out runs/soup

what you get in --out (for a sweep: in --out/<lr=..._seed=..._aug=..._ls=...>/):
  checkpoints/   resumable train state; run the same command again to resume a killed run
  model/         final weights, for jaxmodels.load(NAME, path) (SSF is folded away: plain model)
  metrics.jsonl  one JSON object per logged step / evaluation
  result.json    config, final accuracy, trainable parameter count, time

modes:
  full    every parameter                      linear  the classifier head only
  bitfit  all biases + head (Ben Zaken 2022)   ssf     SSF scale/shift + head (Lian 2022)

data: tfds:NAME[:SPLIT] (read with tfds.data_source, needs the dataset already prepared in
  --tfds-data-dir as ArrayRecord; no TensorFlow), a .npz with 'images' [N,H,W,C] uint8 and
  'labels' [N], or a folder with one sub-folder per class. Images are prepared with the model's
  own normalisation and resize (jaxmodels.spec); training adds random-resized-crop + flip.

devices: the batch is split over every visible device (data parallel); --batch-size is the
  global batch and must be divisible by the device count. On several hosts, start the same
  command on every host with --distributed (jax.distributed.initialize: automatic on Cloud TPU
  and SLURM, else set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); each host
  then reads only its share of every batch.
"""


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _words(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
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
    parser.add_argument("--eval-data", help="evaluated after each epoch (optional)")
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
    parser.add_argument("--seed", type=_ints, default=[0], help="seed(s) (default 0)")
    parser.add_argument(
        "--augmentation",
        type=_words,
        default=["light"],
        help=f"preset(s) among {sorted(run_lib.AUGMENTATIONS)}: none = centre "
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
    parser.add_argument("--tfds-data-dir", help="TFDS data directory")
    parser.add_argument("--num-workers", type=int, default=4, help="image-loading threads")
    parser.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many steps (smoke tests); the run stays unfinished",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize() first",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()
    base = run_lib.RunConfig(
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
        seed=args.seed[0],
        checkpoint_every=args.checkpoint_every,
        tfds_data_dir=args.tfds_data_dir,
        num_workers=args.num_workers,
        stop_after_steps=args.max_steps,
    )
    grid = {
        "lr": args.lr,
        "seed": args.seed,
        "augmentation": args.augmentation,
        "label_smoothing": args.label_smoothing,
    }
    if all(len(v) == 1 for v in grid.values()):
        results = [run_lib.run(base, progress=not args.no_progress)]
    else:
        configs = sweep.expand_grid(base, {k: v for k, v in grid.items() if len(v) > 1})
        results = sweep.run_sweep(configs, progress=not args.no_progress)
    for result in results:
        final = result.get("final_eval") or {}
        print(
            json.dumps(
                {
                    "out_dir": result["config"]["out_dir"],
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
