"""IntegratedPIFu mode: parse maps written in place for the train and test subjects of a data tree."""
import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import DATA
from original_pipeline import run_original
from schp.utils.outputs import INTEGRATEDPIFU_CODES

TREE = DATA / "IntegratedPIFu"
RENDERS = "rendering_script/buffer_fixed_full_mesh"
PARSES = "rendering_script/render_human_parse_results"
ALL_RENDERS = {("0001", "000"), ("0001", "090"), ("0002", "000"), ("0002", "090"), ("0500", "000"),
               ("0500", "090"), ("0501", "270")}


def digest_tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def small_tree(tmp_path, keep=("000", "270")):
    """The reference tree with one render per subject, to keep runs short."""
    root = tmp_path / "IntegratedPIFu"
    shutil.copytree(TREE, root)
    for image in root.glob(f"{RENDERS}/*/rendered_image_*.png"):
        if not any(image.name.endswith(f"_{yaw}.png") for yaw in keep):
            image.unlink()
    return root


def written_parses(root, parse_root=None):
    parse_root = parse_root or root / PARSES
    return {(p.parent.name, p.stem.rsplit("_", 1)[1]) for p in parse_root.glob("*/rendered_parse_*.npy")
            if not p.stem.endswith("_logits")}


@pytest.fixture(scope="module")
def full_run(checkpoints, tmp_path_factory):
    """The plain command on a copy of the whole reference tree, run once for several tests."""
    from schp.commands import extract as simple_extractor

    root = tmp_path_factory.mktemp("full") / "IntegratedPIFu"
    shutil.copytree(TREE, root)
    before = digest_tree(root)
    code = simple_extractor.main(["--integratedpifu-dir", str(root), "--model-restore",
                                  str(checkpoints("pascal")), "--quiet", "--batch-size", "2"])
    return root, before, code


def test_writes_a_parse_map_and_a_preview_for_every_train_and_test_render(full_run):
    root, _, code = full_run
    assert code == 0
    assert written_parses(root) == ALL_RENDERS
    for subject, yaw in ALL_RENDERS:
        codes = np.load(root / PARSES / subject / f"rendered_parse_{yaw}.npy")
        assert codes.dtype == np.float32 and codes.shape == (1024, 1024)
        assert set(np.unique(codes)) <= set(INTEGRATEDPIFU_CODES.tolist())
        preview = Image.open(root / RENDERS / subject / f"rendered_parse_{yaw}.png")
        assert preview.mode == "P" and preview.size == (1024, 1024)
        labels = np.array(preview)
        assert labels.max() <= 6
        np.testing.assert_array_equal(codes, INTEGRATEDPIFU_CODES[labels])
    assert len(np.unique(labels)) > 1


def test_codes_are_exactly_the_float32_values_integratedpifu_compares_against():
    assert INTEGRATEDPIFU_CODES.dtype == np.float32
    assert INTEGRATEDPIFU_CODES.tolist() == [np.float32(v) for v in (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]


def test_labels_agree_with_the_original_fork(full_run, checkpoints):
    root, _, _ = full_run
    expected, _ = run_original(str(root / RENDERS / "0500" / "rendered_image_090.png"),
                               str(checkpoints("pascal")), "pascal")
    codes = np.load(root / PARSES / "0500" / "rendered_parse_090.npy")
    assert (codes == INTEGRATEDPIFU_CODES[expected]).mean() >= 0.9999


def test_inputs_are_untouched_and_a_rerun_rewrites_nothing(full_run, checkpoints, run_cli):
    root, before, _ = full_run
    after = digest_tree(root)
    assert {k: v for k, v in after.items() if k in before} == before
    outputs = sorted(p for p in root.rglob("rendered_parse_*"))
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    code, _, err = run_cli("--integratedpifu-dir", root, "--model-restore", checkpoints("pascal"))
    assert code == 0
    assert "0 processed, 7 skipped, 0 failed" in err
    assert {p: p.stat().st_mtime_ns for p in outputs} == stamps
    assert not [p for p in root.rglob("*") if ".schp-tmp-" in p.name]


def test_overwrite_redoes_the_renders(checkpoints, run_cli, tmp_path):
    root = small_tree(tmp_path, keep=("270",))
    args = ("--integratedpifu-dir", root, "--model-restore", checkpoints("pascal"))
    assert run_cli(*args)[0] == 0
    target = root / PARSES / "0501" / "rendered_parse_270.npy"
    first = target.read_bytes()
    target.write_bytes(b"stale")
    assert run_cli(*args)[0] == 0 and target.read_bytes() == b"stale"  # skipped: outputs exist
    code, _, err = run_cli(*args, "--overwrite")
    assert code == 0 and "1 processed" in err
    assert target.read_bytes() == first


def test_one_line_lists_missing_folders_and_subject_choice(checkpoints, run_cli, tmp_path):
    root = small_tree(tmp_path, keep=("270",))
    (root / "train_set_list.txt").write_text("0999")  # one id, no newline, no folder
    (root / "test_set_list.txt").write_text("0501")
    code, _, err = run_cli("--integratedpifu-dir", root, "--model-restore", checkpoints("pascal"),
                           "--subjects", "train")
    assert code == 0 and "subject 0999 is listed but has no folder" in err
    assert written_parses(root) == set()
    code, _, err = run_cli("--integratedpifu-dir", root, "--model-restore", checkpoints("pascal"),
                           "--subjects", "test")
    assert code == 0 and written_parses(root) == {("0501", "270")}


def test_without_list_files_every_subject_folder_is_taken(checkpoints, run_cli, tmp_path):
    root = small_tree(tmp_path, keep=("none",))
    (root / "train_set_list.txt").unlink()
    (root / "test_set_list.txt").unlink()
    shutil.copy(TREE / RENDERS / "0501" / "rendered_image_270.png", root / RENDERS / "0002" / "rendered_image_045.png")
    code, _, err = run_cli("--integratedpifu-dir", root, "--model-restore", checkpoints("pascal"))
    assert code == 0 and "taking every subject folder" in err
    assert written_parses(root) == {("0002", "045")}


def test_output_dir_moves_the_npy_tree_and_logits_get_their_own_name(checkpoints, run_cli, tmp_path):
    root = small_tree(tmp_path, keep=("270",))
    elsewhere = tmp_path / "parses"
    code, _, _ = run_cli("--integratedpifu-dir", root, "--model-restore", checkpoints("pascal"),
                         "--output-dir", elsewhere, "--logits")
    assert code == 0
    assert written_parses(root, elsewhere) == {("0501", "270")}
    assert not (root / PARSES).exists()
    codes = np.load(elsewhere / "0501" / "rendered_parse_270.npy")
    logits = np.load(elsewhere / "0501" / "rendered_parse_270_logits.npy")
    assert codes.shape == (1024, 1024) and logits.shape == (1024, 1024, 7)
    np.testing.assert_array_equal(codes, INTEGRATEDPIFU_CODES[logits.argmax(axis=2)])


@pytest.mark.parametrize("dataset", ["lip", "atr"])
def test_other_datasets_are_refused_before_any_work(run_cli, tmp_path, dataset):
    root = small_tree(tmp_path)
    code, _, err = run_cli("--integratedpifu-dir", root, "--dataset", dataset,
                           "--model-restore", tmp_path / "does-not-matter.pth")
    assert code == 2
    assert "needs --dataset pascal" in err
    assert not (root / PARSES).exists()
