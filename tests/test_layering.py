"""The package's layers import one way only (docs/architecture.md): a module may import its own sub-package
and the layers below it, never one above or beside it. Read off every module's source, imports inside
functions included."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sgjax"

# Lower numbers sit lower; a layer imports only layers with a smaller number (and itself).
RANKS = {
    "platform": 0,  # mesh, XLA flags, device memory, compilation cache
    "config_sources": -1,  # flag values from the environment and config files, below config, which uses them
    "config": 0,  # the dataclasses every CLI is built from
    "kernels": 1,
    "cache": 1,
    "constrained": 1,
    "multimodal": 1,  # image loading and preprocessing, multimodal positions (numpy and pillow only)
    "models": 2,
    "executor": 3,
    "engine": 4,
    "server": 5,
    "lang": 5,
    "generate": 5,
    "testing": 6,  # helpers for tests and scripts
}
# The frontend language is a client of the engine's public API (and of servers over HTTP) only.
ONLY_FROM = {"lang": {"lang", "engine"}}
KERNEL_PLATFORMS = ("sgjax.kernels.gpu", "sgjax.kernels.tpu")


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name inside sgjax (None: the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported sgjax module) for every import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("sgjax")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sgjax") and not node.level:
            # `from sgjax.kernels import gpu` imports sgjax.kernels.gpu
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write the absolute module name")
    return found


def violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        layer = layer_of(source)
        if layer is None:
            continue  # sgjax/__init__.py re-exports the frontend language
        if layer not in RANKS:
            problems.append(f"{path}: layer {layer!r} has no rank in tests/test_layering.py (loose module?)")
            continue
        for line, target in imports_of(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            if target.startswith(KERNEL_PLATFORMS) and layer != "kernels":
                problems.append(f"{where}: only sgjax.kernels chooses platform kernels (kernels.select)")
            other = layer_of(target)
            if other is None or other == layer:
                continue
            if other not in RANKS:
                problems.append(f"{where}: unknown layer {other!r}")
            elif layer in ONLY_FROM and other not in ONLY_FROM[layer]:
                problems.append(f"{where}: {layer} may import only {sorted(ONLY_FROM[layer])}")
            elif RANKS[other] >= RANKS[layer]:
                problems.append(f"{where}: {layer} (rank {RANKS[layer]}) may not import {other} (rank {RANKS[other]})")
    return problems


def test_imports_point_down_the_layers():
    assert violations() == []


def test_no_loose_top_level_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "config.py", "config_sources.py"))
    assert loose == []


@pytest.mark.parametrize("line, expected", [
    ("from sgjax.engine.engine import Engine", "sgjax/models/x.py:1 imports sgjax.engine.engine.Engine: models"),
    ("from sgjax.kernels.gpu import greedy_head", "only sgjax.kernels chooses platform kernels"),
    ("import sgjax.server.app", "models (rank 2) may not import server"),
])
def test_checker_catches_a_wrong_import(tmp_path, monkeypatch, line, expected):
    """The checker itself: a module of the models layer importing upwards or a platform's kernels is caught."""
    fake = tmp_path / "sgjax"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "x.py").write_text(line + "\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert any(expected in problem for problem in violations())
