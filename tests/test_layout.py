"""The shape of the code: imports flow commands -> schp -> datasets / networks -> utils, never back."""
import ast

from conftest import ROOT

COMMANDS = {"simple_extractor", "evaluate", "train", "export", "multi_person"}
# for each package, the top-level names its modules must not import
FORBIDDEN = {
    "utils": {"schp", "datasets", "networks"} | COMMANDS,
    "networks": {"schp", "datasets"} | COMMANDS,
    "datasets": {"schp"} | COMMANDS,
    "schp": COMMANDS,
}


def imported_roots(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_imports_flow_one_way():
    wrong = []
    for package, forbidden in FORBIDDEN.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, package
        for path in files:
            wrong += [f"{path.relative_to(ROOT)} imports {root}" for root in imported_roots(path) if root in forbidden]
    assert wrong == []


def test_a_back_edge_would_be_caught(tmp_path):
    helper = tmp_path / "helper.py"
    helper.write_text("def f():\n    from schp.inference import HumanParser\n")
    assert "schp" in set(imported_roots(helper))
