"""Imports point downward only: no module imports one of a higher layer (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src"

# Bottom to top. A module may import its own layer and those below it.
LAYERS = [
    ["tunesmith", "tunesmith.errors", "tunesmith.options", "tunesmith.packages", "tunesmith.files",
     "tunesmith.stopping"],
    ["tunesmith.data"],
    ["tunesmith.model", "tunesmith.methods"],
    ["tunesmith.eval"],
    ["tunesmith.objectives"],
    ["tunesmith.train"],
    ["tunesmith.privacy"],
    ["tunesmith.config"],
    ["tunesmith.store"],
    ["tunesmith.session"],
    ["tunesmith.export", "tunesmith.monitor", "tunesmith.lifecycle", "tunesmith.score", "tunesmith.evaluate"],
    ["tunesmith.recipe", "tunesmith.features", "tunesmith.compare", "tunesmith.align", "tunesmith.judge",
     "tunesmith.search", "tunesmith.predict"],
    ["tunesmith.feedback"],
    ["tunesmith.serve"],
    ["tunesmith.retrain"],
    ["tunesmith.ui"],
    ["tunesmith.cli"],
]


def _layer(module: str) -> int | None:
    """The layer of the longest prefix that names ``module`` or a package holding it."""
    matches = [(len(p), level) for level, prefixes in enumerate(LAYERS) for p in prefixes
               if module == p or module.startswith(p + ".")]
    return max(matches)[1] if matches else None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def _modules():
    for path in sorted((SRC / "tunesmith").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        yield name, path


def test_every_module_has_a_layer():
    assert [name for name, _ in _modules() if _layer(name) is None] == []


def test_no_module_imports_a_higher_layer():
    upward = []
    for name, path in _modules():
        for target in _imports(path):
            if target.startswith("tunesmith") and _layer(target) > _layer(name):
                upward.append(f"{name} imports {target}")
    assert upward == []
