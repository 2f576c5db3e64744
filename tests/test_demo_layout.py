"""The demo's modules import one way: miniature (world, prior) -> demo (runs) -> selection -> tables/plots.
Every import counts, function-level ones included, so none of them can hide a cycle."""
import ast
from pathlib import Path

import dspt

SRC = Path(dspt.__file__).parent
OURS = ("demo", "miniature", "pretrain", "selection", "tables", "plots")


def _imports(module: str) -> set[str]:
    """dspt modules `module` imports anywhere in its body ("" is the package itself, dspt/__init__)."""
    path = SRC / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = SRC / module.replace(".", "/") / "__init__.py"
    package = module.rpartition(".")[0] if path.name != "__init__.py" else module
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "dspt" or node.module.startswith("dspt.")):
                target = node.module[len("dspt."):] if node.module != "dspt" else ""
            else:
                continue
            found.add(target)
            for alias in node.names:  # `from . import io` imports the module dspt.io
                sub = f"{target}.{alias.name}" if target else alias.name
                if (SRC / (sub.replace(".", "/") + ".py")).is_file():
                    found.add(sub)
        elif isinstance(node, ast.Import):
            found |= {a.name[len("dspt."):] for a in node.names if a.name.startswith("dspt.")}
    return found


def test_one_way_flow():
    allowed = {  # what each may import from dspt, at most
        "selection": set(), "tables": set(), "plots": {"io"},  # leaves: pandas in, text or a file out
        "pretrain": {"prompt"}, "miniature": {"", "features", "io", "backbone", "pretrain"},
    }
    for module, may in allowed.items():
        assert _imports(module) <= may, (module, _imports(module) - may)
    assert {"miniature", "selection", "tables", "plots"} <= _imports("demo")


def test_no_import_cycle_through_the_demo_modules():
    graph: dict[str, set[str]] = {}
    todo = list(OURS)
    while todo:
        m = todo.pop()
        if m not in graph:
            graph[m] = _imports(m)
            todo += graph[m]
    for start in OURS:  # is `start` reachable from what it imports?
        seen, stack = set(), list(graph[start])
        while stack:
            m = stack.pop()
            assert m != start, f"import cycle through dspt.{start}"
            if m not in seen:
                seen.add(m)
                stack += graph.get(m, ())
