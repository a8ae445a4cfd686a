"""The house's import rule (docs/architecture.md): no layer imports one above it.

Layers, bottom to top: jaxmodels' basics (its root modules), then jaxmodels.data, .models,
.weights, .inference, .committees; then scoring and training, which never import each other;
then hubtune, the application. Read from the source with `ast`, so a lazy import inside a
function counts as much as one at the top of a file.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAYERS = [
    "jaxmodels",
    "jaxmodels.data",
    "jaxmodels.models",
    "jaxmodels.weights",
    "jaxmodels.inference",
    "jaxmodels.committees",
    "scoring",
    "training",
    "hubtune",
]
SIDEWAYS = {"scoring", "training"}  # same height, independent of each other


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to, or None outside the project."""
    parts = module.split(".")
    if parts[0] == "jaxmodels" and len(parts) > 1 and ".".join(parts[:2]) in LAYERS:
        return ".".join(parts[:2])
    return parts[0] if parts[0] in LAYERS else None


def is_basic(root: pathlib.Path, name: str) -> bool:
    """Whether `name` is one of the basics at jaxmodels' root (``jaxmodels.sharding``...)."""
    parts = name.split(".")
    return len(parts) > 1 and (root / "jaxmodels" / f"{parts[1]}.py").exists()


def imported_modules(path: pathlib.Path) -> list[str]:
    """Every name an import statement in `path` brings in (``from a import b`` brings a.b)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def upward_imports(root: pathlib.Path) -> list[str]:
    """'file: layer imports module (layer)' for each import that breaks the rule."""
    problems = []
    for path in sorted(root.glob("*/**/*.py")):
        package = path.relative_to(root).parts[0]
        if package not in {"jaxmodels", "scoring", "training", "hubtune"}:
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mine = layer_of(module)
        if module == "jaxmodels":
            continue  # the curated face of the package re-exports every layer below it
        for name in imported_modules(path):
            theirs = layer_of(name)
            if theirs is None or theirs == mine:
                continue
            if mine.startswith("jaxmodels") and theirs == "jaxmodels" and not is_basic(root, name):
                # the package's face imports every layer, so reaching it from inside is upward
                problems.append(
                    f"{path.relative_to(root)}: {mine} imports {name} from jaxmodels' face"
                )
            elif LAYERS.index(theirs) > LAYERS.index(mine) or {mine, theirs} == SIDEWAYS:
                problems.append(f"{path.relative_to(root)}: {mine} imports {name} ({theirs})")
    return sorted(set(problems))


def test_no_layer_imports_one_above_it():
    assert upward_imports(REPO) == []


@pytest.mark.parametrize(
    ("where", "line"),
    [
        ("jaxmodels/data/extra.py", "from jaxmodels.models import registry\n"),
        ("jaxmodels/inference/extra.py", "def f():\n    from jaxmodels.committees import rules\n"),
        ("jaxmodels/models/extra.py", "import jaxmodels\n"),
        ("jaxmodels/weights/extra.py", "from jaxmodels import create\n"),
        ("jaxmodels/committees/extra.py", "import training\n"),
        ("scoring/extra.py", "from training import load_run\n"),
    ],
)
def test_the_rule_catches_an_upward_import(tmp_path, where, line):
    for package in ("jaxmodels", "scoring", "training", "hubtune"):
        (tmp_path / package).mkdir()
    target = tmp_path / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(line)
    assert len(upward_imports(tmp_path)) == 1
