"""Average fine-tuned runs into model soups, and compare them with the runs and their ensemble.

Usage:
    hubtune soup --runs SWEEP_DIR | RUN_DIR... --heldout DATA_SPEC [--test DATA_SPEC]
                 [--method greedy,uniform[,learned][,wise-ft][,task-arithmetic][,ties][,dare]]
                 [--bn auto|average|recompute] [--trajectory] --out DIR

A model soup averages the weights of models fine-tuned from one starting point: one model's
inference cost, often the accuracy of the best run or better (Wortsman et al., ICML 2022).
--runs takes a sweep folder of hubtune tune (its sweep.json lists the runs) and/or run
folders; the architecture is read from them. Methods:
  greedy   runs sorted by held-out accuracy; each is added to the soup if the soup's held-out
           accuracy does not drop (the paper's ">=", --accept ">" to require a rise)
  uniform  the plain average of every run
  learned  mixing weights and a logit temperature fitted on the held-out set (Adam, 5 epochs,
           lr 0.05); holds every run in memory, up to --learned-max-mb
  wise-ft  WiSE-FT: the runs' start (rebuilt from their --model reference) interpolated with
           the best run, α in 0, 0.1, ..., 1 chosen on held-out data; the curve is in soup.png
  task-arithmetic, ties, dare
           merges of every run's task vector (run − start) into the start: their sum, TIES
           (top 20 % of each, elected signs, disjoint mean) or DARE (90 % dropped at random,
           rescaled); the scale λ in 0, 0.1, ..., 1 chosen on held-out data, curves in soup.png.
           Only weights are merged: BatchNorm statistics are the start's, or recomputed
The soups are evaluated on --test (give held-out data that is not your test set: the greedy
soup is chosen on it), against each run alone and the logit ensemble of all runs (k runs cost k
forward passes per image).

What makes a soup work: every run fine-tuned from the same weights, head included. Start each
run from one linear-probe run (LP-FT: --model NAME=LP_RUN/model in hubtune tune); runs whose
starting weights differ get a warning, runs of different architectures or base checkpoints are
refused. Keep learning rates modest: a run carried out of the shared basin drags the average.

BatchNorm (ResNets): an average of weights changes what each BatchNorm layer sees, so averaged
running statistics describe no model; a uniform soup of BatchNorm networks can then be far below
its runs. So by default (--bn auto) each soup's statistics are re-estimated (exact mean and
variance of every BatchNorm input over --bn-data, default the held-out set, in train-mode
passes; SWA's practice) and the greedy soup judges every run and every candidate with
recomputed statistics: one yardstick. --bn average keeps averaged statistics. ViTs (LayerNorm)
have no such statistics: averaging is all they need.

Written to --out (a new folder; nothing is written unless everything succeeds):
  soup.json   every run's held-out/test accuracy and loss, the ensemble, each soup (members,
              weights, the greedy steps), warnings
  soup.png    the greedy soup's held-out accuracy as runs are tried, the runs alone as points,
              the ensemble and other soups as lines
  greedy/ uniform/ learned/   one run folder per soup: jaxmodels.load(DIR/greedy) and
              training.load_run(DIR/greedy) read it; model/model.json says what it is
--trajectory: the ingredients are the checkpoints one run kept along its training (each
--checkpoint-every steps with --keep-checkpoints 0), averaged as the runs of a sweep are.

A user error (empty sweep, unfinished run, mixed architectures, data with other classes, an
--out holding results) is one line and exit status 2.

Memory: runs are read one at a time (about two models in memory for greedy and uniform). glibc
keeps freed arrays in its arenas unless its mmap threshold is fixed; this script fixes it at 1
MiB at start-up (as MALLOC_MMAP_THRESHOLD_=1048576 would), so streamed runs return their memory.

Example:
    hubtune tune --model vit_s16=LP_RUN/model --mode full --lr 1e-5,3e-5,1e-4 \\
        --seed 0,1 --data tfds:cifar10:train[:45000] --out runs/sweep
    hubtune soup --runs runs/sweep --heldout tfds:cifar10:train[45000:] \\
        --test tfds:cifar10:test --method greedy,uniform --out runs/soup
"""

import argparse
import json
import logging
import pathlib
import sys

from training.soups import ingredients

# before anything allocates: freed checkpoints go back to the system (module docstring)
ingredients.fix_mmap_threshold()

import jaxmodels  # noqa: E402
from hubtune import output  # noqa: E402
from hubtune.parsing import Parser, interruptible  # noqa: E402
from hubtune.soup import cook as soup_cook  # noqa: E402
from hubtune.soup import output as soup_output  # noqa: E402
from hubtune.soup import plan as soup_plan  # noqa: E402
from training.config import RunError  # noqa: E402
from training.soups import averaging as soups  # noqa: E402

PROG = "hubtune soup"  # in usage lines, errors and warnings, also as scripts/*.py

USER_ERRORS = (RunError, jaxmodels.DataError, jaxmodels.ModelRefError)


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser.from_doc(PROG, __doc__)
    parser.add_argument(
        "--runs", nargs="+", required=True, metavar="DIR", help="a sweep folder and/or run folders"
    )
    parser.add_argument("--heldout", required=True, metavar="DATA_SPEC", help="held-out data")
    parser.add_argument("--test", metavar="DATA_SPEC", help="test data (reported only)")
    parser.add_argument(
        "--method",
        default="greedy,uniform",
        help=f"comma-separated, from {','.join(soup_plan.METHODS)} (default greedy,uniform)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="a new output folder")
    parser.add_argument(
        "--bn",
        choices=soup_plan.BN_MODES,
        default="auto",
        help="BatchNorm statistics of each soup: recomputed on --bn-data, averaged, or auto "
        "(default: recomputed when the runs have BatchNorm statistics)",
    )
    parser.add_argument(
        "--bn-data", metavar="DATA_SPEC", help="data for --bn recompute (default the held-out set)"
    )
    parser.add_argument(
        "--accept", choices=soups.ACCEPT_RULES, default=">=",
        help="greedy rule: keep a run if the soup's accuracy does not drop (>=, the paper's) or "
        "rises (>)",
    )  # fmt: skip
    parser.add_argument(
        "--learned-max-mb",
        type=float,
        help="largest float32 stack of all runs the learned soup may hold (default: half the "
        "accelerator's memory, else the host's)",
    )
    parser.add_argument(
        "--learned-by-layer", action="store_true", help="learned: one weight vector per tensor"
    )
    parser.add_argument(
        "--trajectory",
        action="store_true",
        help="each run folder stands for the checkpoints it kept, oldest first (fine-tune with "
        "--keep-checkpoints 0 to keep them all): a soup of one run's trajectory",
    )
    parser.add_argument("--tfds-data-dir", help="TFDS data directory")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


@interruptible(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    progress = not args.no_progress
    settings = output.settings_of(args, ignore=("no_progress", "tfds_data_dir"))
    try:
        stored = output.check(args.out, "soup", settings)
    except output.OutputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if stored is not None:
        print(f"{args.out}: souped before with these settings; nothing recomputed. Stored result:")
        print((pathlib.Path(args.out) / soup_output.SOUP_JSON).read_text())
        return 0
    try:
        plan = soup_plan.plan(
            args.runs,
            args.heldout,
            out=args.out,
            test=args.test,
            methods=[m for m in args.method.split(",") if m],
            bn=args.bn,
            bn_data=args.bn_data,
            accept=args.accept,
            learned_max_bytes=None
            if args.learned_max_mb is None
            else max(1, int(args.learned_max_mb * 1e6)),
            learned_by_layer=args.learned_by_layer,
            trajectory=args.trajectory,
            data_dir=args.tfds_data_dir,
        )
        for warning in plan.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        report = soup_cook.cook(plan, progress=progress)
    except USER_ERRORS as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    output.mark(plan.out, "soup", settings)
    print(soup_output.format_table(report))
    print(json.dumps({"out": str(plan.out), "soups": sorted(report["soups"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
