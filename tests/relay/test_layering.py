"""The direction of imports: rules <- gateway <- web <- sealrelay, and nothing reaching back.

Read from the source with ast, never imported, so it is fast and sees every import, also
those inside functions and under TYPE_CHECKING: a cycle hidden in a function or a type hint
is still a cycle to whoever has to move one of its modules. Inside gateway the capability
packages (store, mail, outbound, links, letters, intake, fronts, texts) form no circle
either, so each can be read, tested and replaced from the ones below it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# lowest first: each may import only itself and what comes before it
PACKAGES = ("rules", "gateway", "web", "sealrelay")


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {
        module_name(root, path): path
        for package in packages
        for path in (root / package).rglob("*.py")
    }


def imported(name: str, path: Path, known: Mapping[str, Path]) -> Iterator[str]:
    """The project modules `name` imports: `from gateway import mime` is gateway.mail.mime."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in known else base for t in targets]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Each module with the project modules it imports anywhere in its source."""
    known = modules(root, packages)
    return {name: set(imported(name, path, known)) for name, path in known.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
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


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_module_imports_itself_round_a_circle(graph: dict[str, set[str]]) -> None:
    circles = [
        "among " + ", ".join(component) + ":\n    " + "\n    ".join(_edges_within(graph, component))
        for component in cycles(graph)
    ]
    assert not circles, "import cycles:\n" + "\n".join(circles)


def _edges_within(graph: Mapping[str, set[str]], component: list[str]) -> list[str]:
    return [
        f"{name} -> {target}"
        for name in component
        for target in sorted(graph[name])
        if target in component
    ]


def test_each_package_imports_only_the_ones_below_it(graph: dict[str, set[str]]) -> None:
    upward = [
        f"{name} -> {target}"
        for name, targets in graph.items()
        for target in sorted(targets)
        if PACKAGES.index(target.split(".")[0]) > PACKAGES.index(name.split(".")[0])
    ]
    assert upward == []


def capability(module: str) -> str:
    """gateway.letters.desk is in gateway.letters; gateway.config is a place of its own."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "gateway" else parts[0]


def test_the_capability_packages_of_gateway_form_no_circle(graph: dict[str, set[str]]) -> None:
    packages: dict[str, set[str]] = {}
    for name, targets in graph.items():
        if name.startswith("gateway."):
            packages.setdefault(capability(name), set()).update(
                capability(t) for t in targets if t.startswith("gateway.")
            )
    for name, targets in packages.items():
        targets.discard(name)
        for target in targets:
            packages.setdefault(target, set())
    assert cycles(packages) == []


def test_the_reader_sees_every_kind_of_import_and_finds_the_circles(tmp_path: Path) -> None:
    sources = {
        "a/__init__.py": "",
        "a/one.py": "def f() -> None:\n    from a.two import g\n",
        "a/two.py": "import typing\nif typing.TYPE_CHECKING:\n    from a import three\n",
        "a/three.py": "from . import one\nimport os\n",
        "a/four.py": "from a import VERSION\nimport a.one\n",
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, ("a",))
    assert graph == {
        "a": set(),
        "a.one": {"a.two"},
        "a.two": {"a.three"},
        "a.three": {"a.one"},
        "a.four": {"a", "a.one"},
    }
    assert cycles(graph) == [["a.one", "a.three", "a.two"]]
