"""The package tree is a DAG of imports: no module of edgellm's imports, directly or through others, a
module that imports it back. Imports of edgellm's own modules sit at the top of a module; one placed
inside a function must say why on its line (`# lazy: ...`: an optional dependency, a timed import),
so that a circle cannot hide behind one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"runtime": "edgellm", "export": "edgellm.export", "boards": "edgellm.boards"}


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the three packages (boards/arm64 is CI tooling)."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if "arm64" in parts:
                continue
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool, str]]:
    """(imported edgellm module, line, inside a function, the line's text) for each import in `path`."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never executed
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                targets = [
                    f"{child.module}.{alias.name}" if f"{child.module}.{alias.name}" in known else child.module
                    for alias in child.names
                ]
            for target in targets:
                if target.split(".")[0] == "edgellm" and target in known:
                    found.append((target, child.lineno, in_function, lines[child.lineno - 1]))
            visit(child, local)

    visit(ast.parse(text), False)
    return found


def explained(path: Path, line: int) -> bool:
    """`# lazy:` on the import's line or in the comment lines right above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if "# lazy:" in lines[line - 1]:
        return True
    above = line - 2
    while above >= 0 and lines[above].strip().startswith("#"):
        if "# lazy:" in lines[above]:
            return True
        above -= 1
    return False


def test_no_import_of_an_own_module_inside_a_function_without_a_reason():
    known = set(modules())
    unexplained = [
        f"{path.relative_to(ROOT)}:{line}: {text.strip()}"
        for name, path in modules().items()
        for target, line, local, text in imports(path, known)
        if local and not explained(path, line)
    ]
    assert unexplained == [], "function-local imports of edgellm modules:\n" + "\n".join(unexplained)


def test_the_import_graph_has_no_circle():
    known = modules()
    # An import of a module's own ancestor package (`from edgellm import __version__`) adds nothing: Python
    # runs every ancestor's __init__ before the module itself. The root's lazy `load` is such a re-export.
    graph = {
        name: sorted(
            {target for target, *_ in imports(path, set(known)) if target != name and not name.startswith(target + ".")}
        )
        for name, path in known.items()
    }
    # Tarjan's strongly connected components: any with more than one module is a circle.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, []):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    assert circles == [], "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_graph_sees_the_modules_and_their_edges():
    """The two tests above judge something real: the walk finds the packages' modules and known edges."""
    known = modules()
    assert {"edgellm.model", "edgellm.bundle.manifest", "edgellm.export.exporter", "edgellm.boards.profile"} <= set(
        known
    )
    edges = {target for target, *_ in imports(known["edgellm.model"], set(known))}
    assert {"edgellm.bundle.manifest", "edgellm.backends.registry", "edgellm.generate.generation"} <= edges
