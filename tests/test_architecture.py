"""The dependency DAG of docs/ARCHITECTURE.md, checked on the package's own imports.

Layers, lowest first: ``_validation`` and ``registry``; ``ops``; ``base`` and ``metrics``; the
loss families (none imports another); ``composite``; ``functional`` and ``gradcache``; the
package's public API (``embedloss/__init__``); ``compat`` and ``integrations``; ``cli``. A module imports only from a
lower layer or from its own package, the module graph has no cycle, and only the command line
imports inside functions (to start fast and to name a missing optional dependency), never to
hide a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "embedloss"
FAMILIES = (
    "contrastive",
    "multimodal",
    "self_supervised",
    "supervised",
    "self_distillation",
    "metric_learning",
    "text",
)
LAYER = {
    "_validation": 0,
    "registry": 0,
    "ops": 1,
    "base": 2,
    "metrics": 2,
    "momentum": 2,
    **dict.fromkeys(FAMILIES, 3),
    "composite": 4,
    "functional": 5,
    "gradcache": 5,
    "__init__": 6,  # the public API; the entry points above it may use it
    "compat": 7,
    "integrations": 7,
    "cli": 8,
    "__main__": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("embedloss", *parts))
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _target(module: str, name: str | None) -> str:
    """The imported module: ``from pkg import sub`` names ``pkg.sub`` when it is a module."""
    if name is not None and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """``(top-level imports of embedloss modules, lazy ones inside functions)``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    lazy: list[str] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [_target(child.module, a.name) for a in child.names]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            names = [n for n in names if n == "embedloss" or n.startswith("embedloss.")]
            if in_function:
                lazy.extend(names)
            else:
                found.update(names)
            visit(child, inner)

    visit(tree, False)
    return found, lazy


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYER:
        raise AssertionError(f"{module}: its package {top!r} has no layer in the DAG table")
    return top, LAYER[top]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    package, layer = _layer(module)
    imports, lazy = GRAPH[module]
    # Only the command line defers imports (start-up time; optional dependencies).
    assert package == "cli" or not lazy, f"{module} imports {lazy} inside a function"
    for target in {*imports, *lazy}:
        other, other_layer = _layer(target)
        if other == package:
            continue
        assert other_layer < layer, (
            f"{module} (layer {layer}, {package}) imports {target} (layer {other_layer}, {other}): "
            "a module may import only from a lower layer or its own package"
        )


def test_module_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, (set(), []))[0]):
            if nxt not in MODULES:
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_a_back_edge_and_a_cycle(tmp_path):
    # The checks above must be able to fail: a family importing another is a back-edge.
    assert _layer("embedloss.contrastive.simclr")[1] == _layer("embedloss.multimodal.clip")[1]
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from embedloss.ops import info_nce\n", encoding="utf-8")
    assert _imports(bad) == (set(), ["embedloss.ops.info_nce"])


def test_only_ops_distributed_talks_to_other_ranks():
    # Every collective of a loss goes through embedloss.ops.distributed, whose first collective
    # of a call is the ranks' agreement (ops.distributed.ranks_agree): a direct torch.distributed
    # call could run before it and leave ranks waiting on each other.
    pattern = re.compile(r"\bdist\.(all_reduce|all_gather|broadcast|reduce|gather|scatter)\b")
    offenders = [
        name
        for name, path in MODULES.items()
        if pattern.search(path.read_text(encoding="utf-8"))
        and name != "embedloss.ops.distributed"
        and not name.startswith(("embedloss.cli", "embedloss.integrations"))
    ]
    assert not offenders, f"collectives outside ops.distributed: {offenders}"
