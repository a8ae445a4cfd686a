"""Serve a hub's models as a cascade that saves real time: fit it, compare it, measure it.

Wang et al. (ICLR 2022): a cascade of off-the-shelf models answers each image at the first
stage confident enough (stage k predicts with the mean of models 1..k's logits, and the image
leaves when that prediction's top probability beats the stage's threshold); it matches the
largest model's accuracy at a fraction of its average cost.

Usage:
    hubtune serve --models MODEL MODEL... --heldout DATA --test DATA --out DIR
                              [--target-accuracy A | --flops-budget GFLOPS] [--no-timing]

What it does:
  1. computes each model's logits once on the held-out and the test set, with the model's own
     evaluation preprocessing, on all devices, and caches them under --cache-dir (default
     {cache}), keyed by the weights' content hash, the data and the preprocessing: a second
     run on the same models and data (e.g. with another target) reads them back and builds no
     model for them;
  2. orders the models by cost (FLOPs per image, from the architecture) and searches the
     accuracy / average-cost Pareto frontier of cascades of up to --max-stages of them on the
     held-out set;
  3. chooses the cascade for the goal: by default the cheapest that keeps the costliest
     model's held-out accuracy; --target-accuracy A the cheapest reaching A; --flops-budget G
     the most accurate averaging at most G GFLOPs per image. A goal no cascade meets is said,
     and the best found is reported (exit status 0);
  4. scores every model, the ensemble of all (mean logits) and the chosen cascade on the test
     set, and times them there with the adaptive executor (only undecided images run the next
     model); --no-timing skips the timing and works from the logits alone;
  5. prints the frontier and the comparison, and writes DIR/cascade.json (every number, the
     cache files of the logits) and DIR/cascade.png (test accuracy vs average GFLOPs).

MODEL (two or more):
  NAME=CHECKPOINT       a .safetensors (torchvision/timm), a .npz (big_vision ViT) or a folder
                        written by jaxmodels.save; NAME one of {names}
  RUN_FOLDER            a finished hubtune tune run (its architecture is read from it)
  SWEEP_FOLDER          a finished sweep (with sweep.json): every run in it
  NAME                  a random initialisation (seed --seed), for trying the tool out
  LABEL:MODEL           any of these with a short label for tables and plots (default: the
                        run folder's name, the file's stem, or NAME; a sweep's runs are
                        LABEL/RUN)
  All models must have the same classes.

DATA: a .npz with 'images' [N, H, W, 3] uint8 and 'labels' [N]; a folder with one sub-folder
  of images per class; or tfds:NAME:SPLIT (prepared beforehand as ArrayRecord under
  --tfds-data-dir; nothing is downloaded). The held-out set fits the thresholds; the test set,
  which should be another one, judges them. Their labels must be classes of the models.

Output folder: created if needed. A report is never overwritten: a folder that already holds
cascade.json or cascade.png is refused at the start (the message names a free one, OUT-2, ...);
one that a concurrent run filled meanwhile gets the report in the next free OUT-2, ... instead,
and the script says so.

A user error (a missing or unfinished run, models of different class counts, data with labels
beyond the models' classes, NaN logits, a bad option) prints one line and exits with status 2,
before any heavy work wherever it can be known then. Progress goes to stderr, the report to
stdout.

Example:
    hubtune serve --models small:runs/resnet18 mid:runs/resnet50 big:runs/vit_b16 \\
        --heldout tfds:cifar10:train[45000:] --test tfds:cifar10:test --out reports/cifar10
"""

import argparse
import pathlib
import sys

import jaxmodels
from hubtune import output
from hubtune.parsing import Parser, interruptible
from hubtune.serve import output as cascade_output
from hubtune.serve import report as cascade_report
from hubtune.serve.members import CascadeInputError
from jaxmodels.committees import rules as cascade_rules
from jaxmodels.committees.fit import MAX_STAGES
from jaxmodels.inference.artefact_cache import default_cache_dir

PROG = "hubtune serve"  # in usage lines, errors and warnings, also as scripts/*.py

USER_ERRORS = (CascadeInputError, jaxmodels.DataError, jaxmodels.ModelRefError)


def parse_args(argv=None) -> argparse.Namespace:
    doc = __doc__.format(names=", ".join(jaxmodels.MODEL_NAMES), cache=default_cache_dir())
    parser = Parser.from_doc(PROG, doc)
    parser.add_argument("--models", nargs="+", required=True, metavar="MODEL")
    parser.add_argument("--heldout", required=True, metavar="DATA", help="fits the thresholds")
    parser.add_argument("--test", required=True, metavar="DATA", help="scores and times")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    goal = parser.add_mutually_exclusive_group()
    goal.add_argument(
        "--target-accuracy",
        type=float,
        metavar="A",
        help="held-out accuracy to keep, in (0, 1] (default: the costliest model's)",
    )
    goal.add_argument(
        "--flops-budget", type=float, metavar="GFLOPS", help="average GFLOPs per image allowed"
    )
    parser.add_argument(
        "--rule",
        default="ensemble",
        choices=cascade_rules.RULES,
        help="stage k predicts with the mean logits of models 1..k (ensemble, the paper's) or "
        "model k alone (single); default ensemble",
    )
    parser.add_argument(
        "--confidence",
        default="max_prob",
        choices=sorted(cascade_rules.CONFIDENCES),
        help="what a threshold is compared with: top-1 probability (max_prob, default), top-1 "
        "minus top-2 (margin), or sum p log p (neg_entropy)",
    )
    parser.add_argument(
        "--max-stages",
        type=int,
        default=MAX_STAGES,
        help=f"longest cascade searched, 1..{MAX_STAGES} (default {MAX_STAGES})",
    )
    parser.add_argument("--no-timing", action="store_true", help="skip the measured wall times")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, best kept (3)")
    parser.add_argument(
        "--batch-size", type=int, help="global batch, a multiple of the device count"
    )
    parser.add_argument("--cache-dir", help=f"logits cache (default {default_cache_dir()})")
    parser.add_argument("--seed", type=int, default=0, help="seed of random-init models (0)")
    parser.add_argument("--tfds-data-dir", help="TFDS data directory")
    return parser.parse_args(argv)


@interruptible(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda text: print(text, file=sys.stderr, flush=True)
    settings = output.settings_of(args, ignore=("cache_dir", "tfds_data_dir", "batch_size"))
    try:
        stored = output.check(args.out, "serve", settings)
        if stored is not None:
            print(f"{args.out}: served before with these settings; nothing recomputed. "
                  "Stored result:")  # fmt: skip
            print((pathlib.Path(args.out) / cascade_output.OUTPUTS[0]).read_text())
            return 0
        report = cascade_report.run_report(
            args.models,
            args.heldout,
            args.test,
            target_accuracy=args.target_accuracy,
            flops_budget=args.flops_budget,
            rule=args.rule,
            confidence=args.confidence,
            max_stages=args.max_stages,
            cache_dir=args.cache_dir,
            batch_size=args.batch_size,
            seed=args.seed,
            data_dir=args.tfds_data_dir,
            timing=not args.no_timing,
            repeats=args.repeats,
            log=log,
        )
    except (*USER_ERRORS, output.OutputError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(cascade_output.format_report(report))
    out = pathlib.Path(args.out)
    paths = cascade_output.write_outputs(report, out)
    output.mark(paths[0].parent, "serve", settings)
    if paths[0].parent != out:  # never over another run's report
        where = str(paths[0].parent)
        log(f"{str(out)!r} received another run's report meanwhile; this one went to {where!r}")
    for path in paths:
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
