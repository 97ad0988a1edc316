"""The package's layering, as docs/architecture.md draws it: checked on the source, so a change
that makes data/ reach into training/ or a loader into the data module fails here."""

import ast
from pathlib import Path

import alexnet_dist

PACKAGE = Path(alexnet_dist.__file__).parent

# data/ from the top: each module may import only modules of earlier layers (or its own).
LAYERS = [
    {"store", "shard_cache"},
    {"transforms", "normalize"},
    {"shard_index", "manifest", "sources", "images", "members", "shards", "stats", "index", "watch"},
    {"plan", "samples", "trace", "resized_crop"},
    {"loader", "loader_choice", "dali_pipeline", "wds", "dali"},
    {"datamodule", "photos"},
]
# Imports within a layer: normalisation uses the geometry; the manifest check, the writer and the
# statistics read and write DALI index files through shard_index; the image conversion takes the
# sources' samples; the writer uses both, reads the manifest and clears stale statistics; the
# statistics read the manifest and see each picture as the loaders do (images.py); the indexer of
# other tools' tars writes with the writer's helpers, reads sample keys off index lines through
# shard_index and sizes as shown through images.py; members.py (which member is the image and the
# label) asks images.py which pictures both decoders read alike, and the manifest, the writer and
# the indexer record or read its format; what a training started with is the manifest's digest
# (watch.py); the loaders share the contract in loader.py and never import each other; the shard
# cache reads through the store; the plan's layer holds the order of samples, the reading of one
# sample, the trace of what was read and the decoding of one random-resized crop, none importing
# another.
WITHIN = {
    "shard_cache": {"store"},
    "normalize": {"transforms"},
    "images": {"sources"},
    "manifest": {"shard_index", "members"},
    "members": {"images"},
    "shards": {"manifest", "sources", "images", "stats", "shard_index", "members"},
    "stats": {"manifest", "shard_index", "images"},
    "index": {"manifest", "shards", "shard_index", "members", "images"},
    "watch": {"manifest"},
    "wds": {"loader"},
    "dali": {"loader", "dali_pipeline"},
}


def imported(path: Path) -> set[str]:
    """Modules of alexnet_dist that `path` imports, as dotted names below the package."""
    names = set()
    package = path.parent.relative_to(PACKAGE).parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1])
            parts = base + (node.module.split(".") if node.module else [])
            if node.module is None:
                names |= {".".join([*parts, alias.name]) for alias in node.names}
            else:
                names.add(".".join(parts))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alexnet_dist."):
            names.add(node.module.removeprefix("alexnet_dist."))
    return names


def test_data_modules_import_only_the_layers_above_them_and_never_training():
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    assert set(layer_of) == {p.stem for p in (PACKAGE / "data").glob("*.py")} - {"__init__"}
    for name, layer in layer_of.items():
        for target in imported(PACKAGE / "data" / f"{name}.py"):
            top, _, rest = target.partition(".")
            assert top not in ("training", "cli"), f"data/{name}.py imports {target}"
            if top == "data":
                assert layer_of[rest] < layer or (layer_of[rest] == layer and rest in WITHIN.get(name, set())), (
                    f"data/{name}.py imports data/{rest}.py, which is not above it"
                )


def test_models_import_neither_data_nor_training():
    for path in (PACKAGE / "models").glob("*.py"):
        assert not {t for t in imported(path) if t.split(".")[0] in ("data", "training", "cli")}, path.name


def test_training_knows_no_data_format_entry_point_or_measuring_tool():
    """training/ takes whatever LightningModule and data module it is given: the Run gets them as
    arguments from cli/, never by importing data/."""
    for path in (PACKAGE / "training").glob("*.py"):
        wrong = {t for t in imported(path) if t.split(".")[0] in ("data", "cli", "bench")}
        assert not wrong, f"training/{path.name} imports {sorted(wrong)}"


def test_entry_points_only_wire_and_nothing_imports_the_measuring_tools():
    """A command in cli/ imports the library's layers and cli/__init__ (the one-line errors), never
    another command; bench/ may use everything, and nothing uses bench/."""
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name != "bench":
            wrong = {t for t in imported(path) if t.split(".")[0] == "bench"}
            assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}"
    for path in (PACKAGE / "cli").glob("*.py"):
        siblings = {t for t in imported(path) if t.startswith("cli.") and (PACKAGE / "cli" / f"{t[4:]}.py").exists()}
        assert not siblings, f"cli/{path.name} imports another command: {sorted(siblings)}"


def test_what_leaves_a_run_is_built_on_the_layers_and_nothing_below_uses_it():
    """trained/ (a checkpoint's network and inputs, the export, prediction) reads checkpoints and
    photos through training/ and data/; they, the models and the commands' shared code never need it."""
    for path in (PACKAGE / "trained").glob("*.py"):
        wrong = {t for t in imported(path) if t.split(".")[0] in ("cli", "bench")}
        assert not wrong, f"trained/{path.name} imports {sorted(wrong)}"
    for folder in ("data", "models", "training"):
        for path in (PACKAGE / folder).glob("*.py"):
            assert not {t for t in imported(path) if t.split(".")[0] == "trained"}, f"{folder}/{path.name}"
