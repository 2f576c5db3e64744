"""The demo's modules import one way: miniature (world, prior) -> demo (runs) -> selection -> tables/plots.
Every import counts, function-level ones included (the graph of tests/test_import_graph.py)."""
from test_import_graph import import_graph


def test_one_way_flow():
    graph = import_graph()
    allowed = {  # what each may import from dspt, at most
        "selection": set(), "tables": set(), "plots": {"io"},  # leaves: pandas in, text or a file out
        "pretrain": {"prompt"}, "miniature": {"version", "features", "io", "backbone", "pretrain"},
    }
    for module, may in allowed.items():
        imports = {m.removeprefix("dspt.") for m in graph[f"dspt.{module}"]}
        assert imports <= may, (module, imports - may)
    assert {"dspt.miniature", "dspt.selection", "dspt.tables", "dspt.plots"} <= graph["dspt.demo"]
