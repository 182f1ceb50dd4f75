"""The code's shape (issue #23): pipeline/'s imports form no cycle, neither between modules
(imports inside functions included) nor between its folders, and no module imports another
module's private (underscore) names. Read from the source with ast; nothing is imported."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pipeline"


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(modules: dict[str, Path]):
    """(module, imported pipeline module, names taken from it) for every import statement."""
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield name, alias.name, []
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    yield name, sub if sub in modules else base, [alias.name]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def folder(module: str) -> str:
    """pipeline.exec.driver -> pipeline.exec; top-level modules are their own folder."""
    return ".".join(module.split(".")[:2])


def graphs():
    modules = module_names()
    between_modules, between_folders = defaultdict(set), defaultdict(set)
    private = []
    for src, dst, names in imports(modules):
        if dst not in modules or dst == src:
            continue
        between_modules[src].add(dst)
        if folder(src) != folder(dst) and folder(dst) != "pipeline":  # pipeline/__init__
            between_folders[folder(src)].add(folder(dst))
        private += [f"{src} imports {dst}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
    return between_modules, between_folders, private


def test_the_checks_find_a_cycle_and_a_private_import():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    modules, _, private = graphs()
    assert len(modules) > 40 and "pipeline.exec.driver" in modules
    assert all("pipeline" in m for m in modules)
    assert isinstance(private, list)


def test_no_import_cycle_between_modules():
    between_modules, _, _ = graphs()
    assert cycle(between_modules) is None


def test_no_import_cycle_between_folders():
    _, between_folders, _ = graphs()
    assert "pipeline.host" in between_folders["pipeline.exec"]  # the graph is really there
    assert cycle(between_folders) is None


def test_no_private_name_imported_from_another_module():
    _, _, private = graphs()
    assert private == []
