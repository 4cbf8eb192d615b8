"""The README's tables say only what is true: each is checked here against the code, or names its test.

The options table must list exactly the extractor's options, and every test a table names in its
`checked by` column must exist. The checkpoint and palette tables are compared with the catalog and
the palette; the refusal messages of the inputs table with what decoding actually says.
"""
import ast
import re

import numpy as np
import pytest

import corpus
from conftest import ROOT
from schp.data.catalog import DATASETS
from schp.data.decode import ImageError, read_image
from schp.utils.palette import class_colors

README = (ROOT / "README.md").read_text()


def table_after(heading_row_start: str):
    """Rows (lists of cells) of the README table whose header row starts with `heading_row_start`."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading_row_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_every_named_test_exists():
    named = set(re.findall(r"`(test_\w+)::(test_\w+)`", README))
    assert len(named) >= 30
    missing = []
    for module, function in named:
        path = ROOT / "tests" / f"{module}.py"
        defined = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)} \
            if path.is_file() else set()
        if function not in defined:
            missing.append(f"{module}::{function}")
    assert not missing, f"README names tests that do not exist: {missing}"


def test_options_table_lists_exactly_the_options_with_their_defaults(monkeypatch):
    from schp.commands import extract as simple_extractor

    monkeypatch.delenv("SCHP_BACKEND", raising=False)  # the tests' torch default is not the users' default

    options, defaults = set(), {}
    for action in simple_extractor.build_parser()._actions:
        if action.option_strings and action.dest not in ("help", "version"):  # every command has these two
            options.update(action.option_strings)
            defaults[action.option_strings[0]] = action.default
    documented = set()
    for option, default, _, checked_by in table_after("| option | default | meaning | checked by |"):
        names = re.findall(r"(--[\w-]+)", option)
        documented.update(names)
        assert checked_by, option
        value = defaults[names[0]]
        if value not in (None, False, ""):
            assert f"`{value}`" in default or default == str(value), (option, value, default)
    assert documented == options


def test_checkpoint_table_matches_the_catalog():
    rows = table_after("| `--dataset` | classes | input |")
    assert len(rows) == len(DATASETS)
    for name, classes, size, link, _ in rows:
        spec = DATASETS[re.search(r"`(\w+)`", name).group(1)]
        assert int(classes) == spec.num_classes
        assert size == f"{spec.input_size[1]}x{spec.input_size[0]}"
        assert f"[{spec.checkpoint}]" in link and spec.drive_id in link


def test_palette_table_matches_the_palette_and_the_labels():
    rows = table_after("| index | colour | pascal | lip | atr |")
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
def test_refusals_of_the_inputs_table_say_what_the_readme_says(tmp_path, make, message):
    assert f'"{message}' in README
    with pytest.raises(ImageError, match=re.escape(message)):
        read_image(make(tmp_path))


def test_alpha_and_sixteen_bit_rules_of_the_inputs_table(tmp_path):
    np.testing.assert_array_equal(read_image(corpus.make_rgba_png(tmp_path)), corpus.base_bgr())
    np.testing.assert_array_equal(read_image(corpus.make_rgb16_png(tmp_path)), corpus.sixteen_bit_source() >> 8)
