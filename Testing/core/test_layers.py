"""The layers inside mimcore (design/architecture.md, "Layers inside mimcore"): imports run
only downward, function-local ones included, and no two modules import each other, directly
or through others.

Layers, bottom to top::

    0  errors, files, devices, events
    1  data, models
    2  bundles, methods, inference, evaluation, reconstruct
    3  training
    4  cli
    5  __main__

Every ``import`` / ``from ... import`` of every module of the package is read with ``ast``
(at module level and inside functions and classes alike). There is no exception list.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mimcore

PACKAGE = "mimcore"
ROOT = Path(mimcore.__file__).resolve().parent

LAYERS: dict[str, int] = {
    "errors": 0, "files": 0, "devices": 0, "events": 0,
    "data": 1, "models": 1,
    "bundles": 2, "methods": 2, "inference": 2, "evaluation": 2, "reconstruct": 2,
    "training": 3,
    "cli": 4,
    "__main__": 5,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The layer of a ``mimcore.*`` module (None for the package itself)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    top = parts[1]
    if top not in LAYERS:
        raise AssertionError(f"{module}: the top-level name {top!r} is in no layer; add it to LAYERS "
                             "(and to design/architecture.md)")
    return LAYERS[top]


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported mimcore module, line) for every import statement in ``path``, resolved to
    the module it names (``from pkg import sub`` counts as ``pkg.sub`` when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    out.append((alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            out.extend((s, node.lineno) for s in subs)
            if len(subs) < len(node.names):
                out.append((target, node.lineno))
    # an import of a submodule imports its packages too, but those are (empty or cheap)
    # __init__ files; the edge that matters is the module named
    return [(m, line) for m, line in out if m != module]


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    modules = all_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    lines: dict[tuple[str, str], int] = {}
    for mod, path in modules.items():
        for target, line in imported_modules(mod, path, modules):
            while target not in modules and "." in target:  # mimcore.x.y where y is a name in x
                target = target.rsplit(".", 1)[0]
            if target == mod or target not in modules:
                continue
            graph[mod].add(target)
            lines.setdefault((mod, target), line)
    return graph, lines


def test_every_module_is_in_a_layer():
    for mod in all_modules():
        layer_of(mod)


def test_imports_only_go_down():
    graph, lines = import_graph()
    offenders = []
    for mod, targets in sorted(graph.items()):
        here = layer_of(mod)
        for target in sorted(targets):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                offenders.append(f"{mod} (layer {here}) line {lines[mod, target]} imports {target} (layer {there})")
    assert not offenders, "imports that go up a layer:\n" + "\n".join(offenders)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph, lines = import_graph()
    cycles = strongly_connected(graph)
    described = []
    for comp in cycles:
        members = set(comp)
        edges = [f"{a} -> {b} (line {lines[a, b]})" for a in comp for b in sorted(graph[a]) if b in members]
        described.append(" <-> ".join(comp) + ":\n    " + "\n    ".join(edges))
    assert not cycles, "import cycles between modules:\n" + "\n".join(described)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The walker is not fooled by imports inside functions or relative imports."""
    src = ("from __future__ import annotations\n"
           "def f():\n    from mimcore.training import engine\n    import mimcore.cli.main\n"
           "class C:\n    def g(self):\n        from ..methods import registry\n")
    path = tmp_path / "probe.py"
    path.write_text(src)
    modules = all_modules()
    found = {m for m, _ in imported_modules("mimcore.models.probe", path, modules)}
    assert {"mimcore.training.engine", "mimcore.cli.main", "mimcore.methods.registry"} <= found
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
