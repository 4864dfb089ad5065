"""Imports flow one way: the face on top, the bridge and provisioning in the middle, settings and
clients at the ground. Read from the source with ast (nothing is imported), lazy imports inside
functions included: an import that only runs later is still a dependency.

    vtuber_letta.commands          the face: the CLI, the demo, `say`
    console                        the streamer's web page over her memory
    bridge                         Redis in, Letta, Redis out
    provisioning                   putting the agent into Letta
    stack | agent_templates        the local stack; who the agent is (siblings: neither imports the other)
    tools                          what the agent can do
    vtuber_letta (the rest)        the ground: settings, clients, Redis keys, viewer ids, the viewer lock

A module may import its own layer's package and anything below it; never a layer above it, never
a sibling. And no two modules may import each other, directly or round a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

LAYERS: list[tuple[str, ...]] = [
    ("vtuber_letta.commands",),
    ("console",),
    ("bridge",),
    ("provisioning",),
    ("stack", "agent_templates"),
    ("tools",),
    ("vtuber_letta",),
]
PACKAGES = sorted({name.split(".")[0] for layer in LAYERS for name in layer})


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imported(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """Our modules a module's source imports (the longest module name each import names)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    found = set()
    for name in names:
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                found.add(".".join(parts[:end]))
                break
    # `from bridge.queue import X` names bridge.queue; drop the package it also named on the way
    return {name for name in found if not any(other.startswith(name + ".") for other in found)}


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imported(ast.parse(path.read_text(encoding="utf-8")), modules) - {name} for name, path in modules.items()}


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, 0 = top; the layer entry the module belongs to), the most specific entry first."""
    matches = [(len(entry), index, entry) for index, layer in enumerate(LAYERS) for entry in layer
               if module == entry or module.startswith(entry + ".")]
    _, index, entry = max(matches)
    return index, entry


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        here, home = layer_of(module)
        for target in sorted(targets):
            there, other = layer_of(target)
            if there < here:
                problems.append(f"{module} imports {target}: {other} is above {home}")
            elif there == here and other != home:
                problems.append(f"{module} imports {target}: {other} and {home} are siblings")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_from_a_layer_above_it_or_a_sibling():
    assert layering_violations(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_module_of_ours_is_in_the_graph_and_in_a_layer():
    graph = import_graph()
    assert {"bridge.service", "vtuber_letta.settings", "vtuber_letta.commands.cli", "tools.memory_gate"} <= set(graph)
    assert graph["vtuber_letta.commands.cli"] >= {"bridge.service", "provisioning.provision"}  # lazy imports count
    assert all(layer_of(module) for module in graph)


@pytest.mark.parametrize("graph, expected", [
    ({"bridge.a": {"vtuber_letta.commands.cli"}, "vtuber_letta.commands.cli": set()},
     ["bridge.a imports vtuber_letta.commands.cli: vtuber_letta.commands is above bridge"]),
    ({"vtuber_letta.settings": {"stack.x"}, "stack.x": set()},
     ["vtuber_letta.settings imports stack.x: stack is above vtuber_letta"]),
    ({"stack.x": {"agent_templates.y"}, "agent_templates.y": set()},
     ["stack.x imports agent_templates.y: agent_templates and stack are siblings"]),
    ({"vtuber_letta.commands.cli": {"bridge.a", "vtuber_letta.settings"}, "bridge.a": {"provisioning.b"}}, []),
])
def test_the_layer_check_itself(graph, expected):
    assert layering_violations(graph) == expected


def test_the_cycle_check_itself():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert cycles(graph) == [["a", "b", "c"]]
