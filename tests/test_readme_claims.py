"""The documentation says only what is true: each table is checked here against the code, or names its test.

The README is short and its links lead somewhere; the reference pages under docs/ hold the tables.
Each command's options table must list exactly that command's options, and every test a page names
in a `checked by` column must exist. The model and palette tables are compared with the catalog and
the palette; the refusal messages of the inputs table with what decoding actually says.
"""
import argparse
import ast
import re

import numpy as np
import pytest

import corpus
from conftest import ROOT
from schp.data.catalog import DATASETS, MULTI_PERSON
from schp.data.decode import ImageError, read_image
from schp.utils.palette import class_colors

DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))


# (command module, its reference page, options documented ahead, options whose default is the machine's)
COMMANDS = [
    ("extract", "extract.md", set(), set()),
    ("multi_person", "multi-person.md", set(), set()),
    ("train", "train.md", set(), {"--num-workers"}),  # min(4, cores): the table says so in words
    ("evaluate", "evaluate.md", set(), set()),
    ("export", "export.md", set(), set()),
]


def page(name: str) -> str:
    return (DOCS / name).read_text()


def table_after(text: str, heading_row_start: str):
    """Rows (lists of cells) of the table in `text` whose header row starts with `heading_row_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading_row_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def command_parser(module, monkeypatch):
    """The command's ArgumentParser: from build_parser, or caught as parse_args is about to parse."""
    if hasattr(module, "build_parser"):
        return module.build_parser()

    class Caught(Exception):
        pass

    def catch(self, args=None, namespace=None):
        raise Caught(self)

    with monkeypatch.context() as patch, pytest.raises(Caught) as caught:
        patch.setattr(argparse.ArgumentParser, "parse_args", catch)
        module.parse_args([])
    return caught.value.args[0]


def test_every_named_test_exists():
    named = set()
    for path in PAGES:
        named.update(re.findall(r"`(test_\w+)::(test_\w+)`", path.read_text()))
    assert len(named) >= 30
    missing = []
    for module, function in named:
        path = ROOT / "tests" / f"{module}.py"
        defined = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)} \
            if path.is_file() else set()
        if function not in defined:
            missing.append(f"{module}::{function}")
    assert not missing, f"the documentation names tests that do not exist: {missing}"


@pytest.mark.parametrize("command, page_name, ahead, machine_defaults", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_options_table_lists_exactly_the_options_with_their_defaults(command, page_name, ahead, machine_defaults,
                                                                     monkeypatch):
    import importlib

    monkeypatch.delenv("SCHP_BACKEND", raising=False)  # the tests' torch default is not the users' default
    module = importlib.import_module(f"schp.commands.{command}")

    options, defaults = set(), {}
    for action in command_parser(module, monkeypatch)._actions:
        if action.option_strings and action.dest != "help":
            options.update(action.option_strings)
            defaults[action.option_strings[0]] = action.default
    text = page(page_name)
    header = "| option | default | meaning |"
    checked = text.splitlines()[[line.startswith(header) for line in text.splitlines()].index(True)].endswith(
        "| checked by |")
    documented = set()
    for row in table_after(text, header):
        option, default = row[0], row[1]
        names = re.findall(r"(--[\w-]+)", option)
        documented.update(names)
        if checked:
            assert row[-1], f"{option}: no test named"
        if names[0] not in defaults or names[0] in machine_defaults:
            continue
        value = defaults[names[0]]
        if isinstance(value, list):
            value = " ".join(value)
        if value in (None, False, "", argparse.SUPPRESS) or isinstance(value, bool):
            continue
        assert f"`{value}`" in default or default == str(value), (option, value, default)
    assert documented == options | ahead


def test_checkpoint_table_matches_the_catalog():
    rows = table_after(README, "| model | classes | input | checkpoint |")
    specs = {**DATASETS, **MULTI_PERSON}
    seen = []
    for name, classes, size, link, _ in rows:
        key = re.search(r"`(\w+)`", name).group(1)
        spec = specs[key]
        seen.append(key)
        assert int(classes) == spec.num_classes
        assert size == f"{spec.input_size[1]}x{spec.input_size[0]}"
        assert f"[{spec.checkpoint}]" in link and spec.drive_id in link
    assert sorted(seen) == sorted(specs)


def test_palette_table_matches_the_palette_and_the_labels():
    rows = table_after(page("outputs.md"), "| index | colour | pascal | lip | atr |")
    assert len(rows) == max(spec.num_classes for spec in DATASETS.values())
    colors = class_colors(len(rows))
    for row in rows:
        index, colour, names = int(row[0]), row[1], row[2:]
        r, g, b = colors[index]
        assert colour == f"`#{r:02x}{g:02x}{b:02x}`"
        for dataset, name in zip(("pascal", "lip", "atr"), names):
            labels = DATASETS[dataset].labels
            assert name == (labels[index] if index < len(labels) else ""), (dataset, index)


@pytest.mark.parametrize("make, message", [
    (corpus.make_dangling_symlink, "broken symbolic link"),
    (corpus.make_symlink_loop, "symbolic link loop"),
    (corpus.make_empty_jpg, "empty file (0 bytes)"),
    (corpus.make_truncated_jpg, "truncated JPEG"),
    (corpus.make_truncated_png, "not a decodable image"),
    (corpus.make_html_as_jpg, "not a decodable image"),
    (corpus.make_text_as_png, "not a decodable image"),
])
def test_refusals_of_the_inputs_table_say_what_the_docs_say(tmp_path, make, message):
    inputs = page("extract.md")
    assert f'"{message}' in inputs
    with pytest.raises(ImageError, match=re.escape(message)):
        read_image(make(tmp_path))


def test_alpha_and_sixteen_bit_rules_of_the_inputs_table(tmp_path):
    np.testing.assert_array_equal(read_image(corpus.make_rgba_png(tmp_path)), corpus.base_bgr())
    np.testing.assert_array_equal(read_image(corpus.make_rgb16_png(tmp_path)), corpus.sixteen_bit_source() >> 8)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_every_link_leads_to_a_file_and_heading():
    assert len(README.splitlines()) <= 250
    linked_docs = re.findall(r"\]\((docs/[^)#\s]+)", README)
    assert len(set(linked_docs)) >= 10  # the README points into the reference pages
    broken = []
    for path in PAGES:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links inside code are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", linked.read_text(), flags=re.S), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, broken
