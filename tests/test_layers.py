"""Imports point one way: the import graph of service/ and client/, read with `ast`, has no
arrow from a lower layer to a higher one and no cycle.

The layer order is written here, once, and docs/ARCHITECTURE.md ("Rules the layout keeps")
says the same in words. Every import counts, also those inside functions: a lazy import is
still a dependency, it only defers when torch loads.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = {  # folder -> the import name it holds (pyproject's package-dir)
    ROOT / "service" / "anchorcredit": ("anchorcredit",),
    ROOT / "client" / "anchorcredit" / "client": ("anchorcredit", "client"),
}

# Lowest first. A module may import its own group and any group of a LOWER rank; groups
# of equal rank know nothing of each other (the server, the client and the offline tools).
LAYERS: dict[str, int] = {
    # torch-free foundations: the contract and what every side shares
    "errors": 0,
    "contract": 1,
    "budget": 1,
    "status": 1,
    "weight_wire": 1,
    "peaks": 1,
    "v1": 1,  # generated stubs
    "anchorcredit": 1,  # the package itself: __version__ (and a lazy Scorer export, below)
    "backend": 2,  # the server/compute seam
    "weight_group": 2,  # the collective group (needs torch: the client imports it lazily)
    "models": 2,  # model provisioning: where a model comes from, the packaged models
    "engine": 3,  # attention statistics: knows nothing of models
    "runner": 4,  # the model: knows nothing of gRPC
    "server": 5,  # gRPC over the backend seam (builds the runner's Scorer lazily)
    "offline": 5,  # the rhythm analysis: above the runner, beside the server
    "client": 5,  # the light client: beside the server, never torch at import
    "client.adapters": 6,  # trainer integrations over the client
    "experiments": 7,  # reproducible experiments over the client adapters and the models
    "cli": 8,  # composes everything
}
# The one upward arrow, on purpose: `anchorcredit.Scorer` is a lazy attribute of the
# package (PEP 562 __getattr__), so `import anchorcredit` stays torch-free.
ALLOWED_UPWARD = {("anchorcredit", "anchorcredit.runner")}
# What the light client may import at module level (the rest only inside a function).
CLIENT_EAGER = {"errors", "contract", "budget", "status", "weight_wire", "v1", "anchorcredit"}


def module_files() -> dict[str, Path]:
    """Every module's import name -> its file."""
    found = {}
    for folder, prefix in SOURCE_ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join((*prefix, *parts))] = path
    return found


MODULES = module_files()


def group(module: str) -> str:
    """The layer a module belongs to: its first folder (or top-level module) in the package."""
    parts = module.split(".")
    if len(parts) == 1:
        return "anchorcredit"
    if parts[1] == "client":
        return "client.adapters" if parts[2:3] == ["adapters"] else "client"
    return parts[1]


def imports_of(path: Path) -> Iterator[tuple[str, bool]]:
    """(anchorcredit module imported, whether at module level) for every import in a file."""
    tree = ast.parse(path.read_text())
    eager = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from anchorcredit import status` imports the module anchorcredit.status
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import anchorcredit.x.y` -> nearest module
                name = name.rpartition(".")[0]
            if name:
                yield name, id(node) in eager


def import_graph() -> dict[str, set[str]]:
    return {
        module: {target for target, _ in imports_of(path) if target != module}
        for module, path in MODULES.items()
    }


GRAPH = import_graph()


def test_every_module_has_a_layer():
    """A new top-level module or folder must be placed in the layer order on purpose."""
    assert len(MODULES) > 100  # the walk found the package
    unplaced = sorted({group(m) for m in MODULES} - set(LAYERS))
    assert not unplaced, f"give these a layer in LAYERS: {unplaced}"


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a module to a group of the same or a higher rank (not its own)."""
    return [
        f"{source} ({group(source)}) imports {target} ({group(target)})"
        for source, targets in sorted(graph.items())
        for target in sorted(targets)
        if group(source) != group(target)
        and {group(source), group(target)} <= set(LAYERS)  # unplaced: the test above
        and LAYERS[group(target)] >= LAYERS[group(source)]
        and (source, target) not in ALLOWED_UPWARD
    ]


def test_no_import_from_a_lower_layer_to_a_higher_one():
    wrong = upward_arrows(GRAPH)
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("anchorcredit.runner.tp_serve", "anchorcredit.server.app"),  # the runner serving gRPC
        ("anchorcredit.runner.loading", "anchorcredit.offline.models"),  # serving on offline
        ("anchorcredit.server.batcher", "anchorcredit.cli.serve"),
        ("anchorcredit.client.transport", "anchorcredit.server.servicer"),
        ("anchorcredit.server.app", "anchorcredit.client.transport"),  # equal rank
        ("anchorcredit.models.packaged", "anchorcredit.runner.loading"),
        ("anchorcredit.engine.credit", "anchorcredit.runner.scorer"),
    ],
)
def test_the_layer_rule_rejects_an_upward_or_sideways_arrow(source, target):
    """The rule is not vacuous: each of these arrows would be reported."""
    assert upward_arrows({source: {target}})


def test_no_import_cycles():
    """Depth-first search over the module graph; a back edge is a cycle."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if (module, target) in ALLOWED_UPWARD:
                continue  # a lazy attribute, resolved after both modules exist
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_light_client_imports_only_torch_free_foundations_at_module_level():
    wrong = [
        f"{module} imports {target} at module level"
        for module, path in sorted(MODULES.items())
        if group(module).startswith("client")
        for target, eager in imports_of(path)
        if eager and not group(target).startswith("client") and group(target) not in CLIENT_EAGER
    ]
    assert not wrong, "\n".join(wrong)
