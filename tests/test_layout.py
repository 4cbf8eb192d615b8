"""The shape of the code: commands -> engine -> data / networks -> small helpers, never back; no circle.

Every `import` counts, also those inside functions (a lazy import is still a dependency), so a
circle such as inference -> backends -> export -> inference is caught even when it works at run time.
"""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "schp"
# the layer of each module (by dotted-name prefix, longest prefix wins); higher layers may import lower ones
LAYERS = {
    "schp.commands": 3,
    "schp": 2,  # the engine: api, inference, runs, evaluation, training, export, multi_person, ...
    "schp.data": 1,
    "schp.networks": 1,
    "schp.utils": 0,
    "schp.errors": 0,
    "schp._checkout_aliases": 0,
}
LEGACY_ROOTS = {"datasets", "networks", "utils", "simple_extractor", "train", "evaluate", "export", "multi_person"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports(path: Path):
    """Absolute dotted names a file imports (from-imports resolved to their module)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            yield base
            # `from schp.data import catalog`: the submodule is what is used
            yield from (f"{base}.{alias.name}" for alias in node.names)


def graph():
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    edges = {}
    for name, path in modules.items():
        edges[name] = sorted({m for m in imports(path) if m in modules and m != name})
    return modules, edges


def test_imports_flow_one_way():
    modules, edges = graph()
    wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, targets in edges.items() for b in targets
             if layer(b) > layer(a) and not (b == "schp" or a.startswith(b + "."))]
    legacy = [f"{name} imports {m}" for name, path in modules.items() for m in imports(path)
              if m.split(".")[0] in LEGACY_ROOTS]
    assert wrong == [] and legacy == []


def find_cycle(edges):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    _, edges = graph()
    # a package's __init__ importing its own submodules is how packages export names, not a circle
    edges = {a: [b for b in bs if not b.startswith(a + ".")] for a, bs in edges.items()}
    assert find_cycle(edges) is None


def test_the_checks_would_catch_a_back_edge_and_a_circle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert layer("schp.commands.extract") > layer("schp.inference") > layer("schp.data.catalog") > layer("schp.utils.outputs")


def test_no_print_in_the_engine():
    """Only the commands print; the engine reports through return values, exceptions, warnings and logging."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if module_name(path).startswith("schp.commands"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in ("stderr", "stdout") and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} sys.{node.attr}")
    assert found == []


def test_the_checkout_aliases_are_the_package_modules():
    import datasets.catalog
    import networks
    import utils.transforms
    from networks import init_model
    import schp.data.catalog
    import schp.networks
    import schp.utils.transforms

    assert networks is schp.networks and utils.transforms is schp.utils.transforms
    assert datasets.catalog is schp.data.catalog and datasets.catalog.__spec__.name == "schp.data.catalog"
    model = init_model("resnet101", num_classes=7, pretrained=None)
    assert model.fushion[3].weight.shape[0] == 7
