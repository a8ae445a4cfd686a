"""The whole workflow on real data, offline, in minutes: select, tune, combine, serve.

    hubtune demo --quick          # 1.5–3.5 min on 2 CPU cores, by the CPU
    hubtune demo                  # the full run: more members, epochs and runs

Data: scikit-learn's handwritten digits (1,797 8×8 images, shipped with the package), upsampled to
32×32 RGB uint8 and split by class. The source task (digits 0–4) pre-trains a hub of small ResNets
and ViTs of different width and depth, plus deliberately weaker ones (fewer epochs, noisy labels);
the hub is cached (`--cache`), so a second run skips it. The target task (digits 5–9, relabelled
0–4) has 15 labelled training images per class — the regime where the choice of pre-trained model
matters — and held-out and test splits, all with a fixed seed.

1. Select — every member is scored on the target with LogME and its peers (`scoring`) and also
   fine-tuned on it (the ground truth, as in the LogME paper's protocol); each score's weighted
   Kendall τ and top-1 regret say how well it ranked the hub.
2. Tune — the top-ranked member: a linear probe, then an SSF sweep (learning rates × seeds) from
   that probe (one shared start), against full fine-tuning from it; the folded SSF model must
   predict what the unfolded one does.
3. Combine — uniform and greedy soups of the SSF sweep against its best single run and the logit
   ensemble of all runs.
4. Serve — a cascade of fine-tuned members of increasing cost, fitted on held-out data to match the
   costliest member's accuracy, run adaptively on the test split and timed against that member.

Writes DIR/report.md (a table and a one-line verdict per step, saying what was measured, also when
a paper's effect does not show at this scale), DIR/report.json, plots (ranking.png, soup.png,
cascade.png) and every run folder. A DIR that already holds a report is kept: the run goes to
DIR-2, DIR-3, ... Fixed seeds make two runs write the same accuracies (times differ).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sys

import jax
import numpy as np

import jaxmodels
from hubtune import output
from hubtune.demo import combine_serve as demo_combine_serve
from hubtune.demo import report as demo_report
from hubtune.demo import steps as demo_steps
from hubtune.parsing import Parser, interruptible
from jaxmodels import host
from jaxmodels.models import registry

PROG = "hubtune demo"  # in usage lines, errors and warnings, also as scripts/*.py

SIZE = 32  # the hub's input side; the 8×8 digits are upsampled ×4


@dataclasses.dataclass(frozen=True)
class HubModel:
    """One model of the demo's hub: an architecture, its overrides and how it is pre-trained."""

    label: str
    name: str
    overrides: tuple = ()
    epochs: int = 0  # 0: the recipe's default
    label_noise: float = 0.0


def hub_members(quick: bool) -> list[HubModel]:
    """8 members (10 in the full run): two families, two sizes each, and a weak copy of each
    size (one epoch, or noisy labels). The quick hub has four architectures, so four compiles."""
    vit_d4 = (("depth", 4), ("width", 48), ("num_heads", 3), ("mlp_dim", 96))
    members = [
        HubModel("resnet-w8", "resnet_tiny"),
        HubModel("resnet-w16", "resnet_tiny", (("width", 16),)),
        HubModel("vit-d2", "vit_tiny"),
        HubModel("vit-d4-w48", "vit_tiny", vit_d4),
        HubModel("resnet-w8-short", "resnet_tiny", epochs=1),
        HubModel("resnet-w16-noisy", "resnet_tiny", (("width", 16),), label_noise=0.5),
        HubModel("vit-d2-noisy", "vit_tiny", label_noise=0.6),
        HubModel("vit-d4-w48-short", "vit_tiny", vit_d4, epochs=1),
    ]
    if not quick:
        members += [
            HubModel("resnet-d2", "resnet_tiny", (("stage_sizes", (2, 2, 2, 2)),)),
            HubModel("vit-d1", "vit_tiny", (("depth", 1),)),
        ]
    return members


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every number the demo's training uses (quick and full differ only here)."""

    pretrain_epochs: int
    finetune_epochs: int
    probe_epochs: int
    ssf_lrs: tuple
    ssf_seeds: tuple
    batch: int = 32
    per_class_train: int = 15
    per_class_heldout: int = 30


QUICK = Recipe(
    pretrain_epochs=3,
    finetune_epochs=8,
    probe_epochs=10,
    ssf_lrs=(3e-3, 1e-2, 3e-2),
    ssf_seeds=(0, 1),
)
FULL = Recipe(
    pretrain_epochs=8,
    finetune_epochs=15,
    probe_epochs=20,
    ssf_lrs=(3e-3, 1e-2, 3e-2),
    ssf_seeds=(0, 1, 2),
)


def digits_splits(seed: int, recipe: Recipe) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The source and target splits as uint8 [N, 32, 32, 3] images and int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * 255 / 16), 0, 255).astype(np.uint8)  # 0..16 → 0..255
    images = np.kron(images, np.ones((SIZE // 8, SIZE // 8), np.uint8))  # nearest ×4
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target
    rng = np.random.default_rng(seed)
    source = np.flatnonzero(labels < 5)
    rng.shuffle(source)
    held = len(source) // 10
    splits = {"source_train": source[held:], "source_heldout": source[:held]}
    train, heldout, test = [], [], []
    for digit in range(5, 10):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        train.append(rows[: recipe.per_class_train])
        heldout.append(
            rows[recipe.per_class_train : recipe.per_class_train + recipe.per_class_heldout]
        )
        test.append(rows[recipe.per_class_train + recipe.per_class_heldout :])
    splits |= {
        "target_train": np.concatenate(train),
        "target_heldout": np.concatenate(heldout),
        "target_test": np.concatenate(test),
    }
    out = {}
    for name, rows in splits.items():
        target = name.startswith("target")
        out[name] = (images[rows], labels[rows] - 5 if target else labels[rows])
    return out


def write_data(folder: pathlib.Path, splits: dict, noise_levels, seed: int) -> dict[str, str]:
    """Each split as an .npz (written once: same content, same file), plus noisy-label copies."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = {}
    for name, (images, labels) in splits.items():
        specs[name] = _write_npz(folder / f"{name}.npz", images, labels)
    images, labels = splits["source_train"]
    for noise in noise_levels:
        rng = np.random.default_rng([seed, int(noise * 100)])
        flip = rng.random(len(labels)) < noise
        noisy = np.where(flip, rng.integers(0, 5, len(labels)), labels)
        specs[f"source_train_noise{noise}"] = _write_npz(
            folder / f"source_train_noise{noise}.npz", images, noisy
        )
    return specs


def _write_npz(path: pathlib.Path, images, labels) -> str:
    if not path.exists():
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        tmp.replace(path)
    return str(path)


def _out_folder(requested: pathlib.Path) -> pathlib.Path:
    """`requested`, or where it holds an earlier report the first free sibling (requested-2,
    -3, ...: `hubtune.output.free_sibling`, the rule every command's refusal suggests)."""
    return output.free_sibling(requested) if (requested / "report.json").exists() else requested


@interruptible(PROG)
def main(argv=None) -> int:
    parser = Parser.from_doc(PROG, __doc__)
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the small recipe: about 1.5–3.5 min on 2 CPU cores, by the CPU (the hub is cached "
        "for later runs)",
    )
    parser.add_argument(
        "--cache",
        help=f"where the pre-trained hub and compiled programs are cached (default "
        f"{jaxmodels.cache_root() / 'demo'})",
    )
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be an integer ≥ 0 (it seeds NumPy's generator); got {args.seed}")
    cache = pathlib.Path(args.cache) if args.cache else jaxmodels.cache_root() / "demo"
    out = _out_folder(pathlib.Path(args.out))
    try:  # a new demo folder, never another tool's (an earlier demo's goes to OUT-2, OUT-3...)
        output.check(out, "demo", None)
    except output.OutputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if out != pathlib.Path(args.out):
        print(f"{args.out} holds an earlier report; writing to {out}")
    # compiled programs persist across runs: a second demo compiles (almost) nothing
    jax.config.update("jax_compilation_cache_dir", str(cache / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    recipe = QUICK if args.quick else FULL
    report = run(out, cache, recipe, hub_members(args.quick), args.seed, quick=args.quick)
    output.mark(out, "demo", {"quick": args.quick, "seed": args.seed})
    print()
    print((out / "report.md").read_text())
    for path in report["written"]:
        print(f"wrote {path}")
    return 0


def run(
    out: pathlib.Path,
    cache: pathlib.Path,
    recipe: Recipe,
    members: list[HubModel],
    seed: int,
    *,
    quick: bool = False,
) -> dict:
    """The four steps with `members` and `recipe`; writes the report into `out`.

    Returns:
      The report (as report.json holds it), plus ``written``: the paths of the files written.
    """
    clock = demo_steps.Clock()
    with clock.step("data"):
        splits = digits_splits(seed, recipe)
        noise = sorted({m.label_noise for m in members if m.label_noise})
        data = write_data(cache / "data", splits, noise, seed)
        print(demo_steps.describe_data(splits))
    with clock.step("hub: pre-train on digits 0–4"):
        hub = demo_steps.pretrain_hub(members, data, recipe, cache, seed, _member_key)
    with clock.step("1. select: score the hub, fine-tune every member"):
        select = demo_steps.select(hub, data, recipe, out, seed, cache / "features")
    with clock.step("2. tune: linear probe, SSF sweep, full fine-tuning"):
        tune = demo_steps.tune(select["top"], hub, data, recipe, out, seed)
    with clock.step("3. combine: soups of the SSF sweep"):
        combine = demo_combine_serve.combine(tune["sweep"], data, recipe, out)
    with clock.step("4. serve: a cascade of fine-tuned members"):
        serve = demo_combine_serve.serve(select["finetuned"], data, recipe, out)
    report = {
        "setup": {
            "quick": quick,
            "seed": seed,
            "recipe": dataclasses.asdict(recipe),
            "members": [m.label for m in members],
            "data": demo_steps.data_sizes(splits),
            "devices": [str(d) for d in jax.devices()],
            "cpu": host.cpu_description(),
        },
        "select": select["report"],
        "tune": tune["report"],
        "combine": combine["report"],
        "serve": serve["report"],
        "seconds": clock.seconds,
    }
    report["written"] = [str(p) for p in demo_report.write(out, report)]
    return report


def _member_key(member: HubModel, recipe: Recipe, data_spec: str, seed: int) -> str:
    """The cache key of a pre-trained member: its spec, the recipe, the data and the seed."""
    text = json.dumps(
        [
            dataclasses.asdict(member),
            recipe.pretrain_epochs,
            recipe.batch,
            jaxmodels.content_digest(data_spec),
            seed,
            registry.MODEL_NAMES,
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


if __name__ == "__main__":
    sys.exit(main())
