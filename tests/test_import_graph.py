"""The package's import graph: no circles, nothing importing a higher layer, imports at the top.

The layers are the folders of ``src/visiontune`` (docs/ARCHITECTURE.md draws them). A module may
import from its own layer or any layer below; an import circle or an upward import means a concern
sits in the wrong folder. Imports go at the top of the file so the graph is visible; only the
command modules defer theirs (``visiontune --help`` must not load torch), and any module may defer
a heavy optional third-party dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "visiontune"

# Bottom to top. A module's layer is its first folder under visiontune/ (or its own name at the top).
LAYERS = [
    {"errors"},
    {"atomic_io", "config", "device", "memory", "metrics", "metrics_multilabel", "safe_yaml"},
    {"distributed"},
    {"checkpoint"},
    {"model"},
    {"data"},
    {"features"},
    {"run"},
    {"training"},
    {"demo"},
    {"commands"},
    {"cli", "__main__", "__init__"},
]
# Modules whose function-level imports of visiontune are deliberate: deferred until the command runs.
DEFERRING_PACKAGES = {"commands"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS and docs/ARCHITECTURE.md")


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(visiontune modules imported at module level, (line, target) of those imported inside functions)."""
    module = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level: set[str] = set()
    deferred: list[tuple[int, str]] = []

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = resolve(module, path.name == "__init__.py", node)
        # `from visiontune.x import y` may name a submodule y: count the deepest module that exists.
        return [f"{base}.{alias.name}" if known(f"{base}.{alias.name}") else base for alias in node.names]

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if is_type_checking_block(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in targets(child):
                    if target == "visiontune" or target.startswith("visiontune."):
                        (deferred.append((child.lineno, target)) if in_function else top_level.add(target))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top_level, deferred


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = all_modules()


def known(name: str) -> bool:
    return name in MODULES


def owning_module(target: str) -> str:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        top_level, deferred = imports_of(path)  # a deferred import still closes a circle
        edges[name] = {owning_module(t) for t in top_level | {t for _, t in deferred}} - {name, ""}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_circle():
    # The check above must be able to fail: a planted a -> b -> c -> a circle is found.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_higher_layer(name):
    top_level, deferred = imports_of(MODULES[name])
    upward = sorted(
        target for target in top_level | {t for _, t in deferred}
        if layer_of(owning_module(target) or target) > layer_of(name)
    )
    assert not upward, f"{name} (layer {layer_of(name)}) imports from a higher layer: {upward}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_internal_imports_are_at_the_top_of_the_file(name):
    if name.split(".")[1:2] and name.split(".")[1] in DEFERRING_PACKAGES:
        return
    _, deferred = imports_of(MODULES[name])
    assert not deferred, f"{name} imports visiontune modules inside functions at lines {deferred}"
