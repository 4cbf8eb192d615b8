"""--label-map / labels_map=: maps written in another label scheme, checked before any model loads."""
import json

import numpy as np
import pytest
from PIL import Image

import corpus
from schp.data.catalog import DATASETS
from schp.data.label_map import label_map_from_dict, load_label_map
from schp.errors import SetupError
from test_video import make_video

PASCAL = DATASETS["pascal"].labels  # Background, Head, Torso, Upper Arms, Lower Arms, Upper Legs, Lower Legs
SCHEME = {"labels": ["background", "upper", "lower"],
          "map": {"Head": "upper", "Torso": "upper", "3": "upper", "Lower Arms": 1,
                  "Upper Legs": "lower", "Lower Legs": "lower"},
          "palette": [[0, 0, 0], [250, 10, 10], [10, 10, 250]]}
TABLE = [0, 1, 1, 1, 1, 2, 2]  # worked out by hand from SCHEME


def read(path):
    with Image.open(path) as image:
        return image.mode, np.asarray(image), image.getpalette()[:9]


def test_the_table_follows_the_file_by_name_and_index_and_unlisted_classes_become_zero():
    mapping = label_map_from_dict(SCHEME, PASCAL)
    assert mapping.table.tolist() == TABLE and mapping.labels == ("background", "upper", "lower")
    assert list(mapping.palette) == [0, 0, 0, 250, 10, 10, 10, 10, 250]
    labels = np.array([[0, 1, 2, 3], [4, 5, 6, 0]], np.uint8)
    assert mapping.apply(labels).tolist() == [[0, 1, 1, 1], [1, 2, 2, 0]]
    partial = label_map_from_dict({"labels": ["bg", "head"], "map": {"Head": "head"}}, PASCAL)
    assert partial.table.tolist() == [0, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("change, reason", [
    ({"map": {"Hat": "upper"}}, "source class 'Hat' is not one of: Background, Head"),
    ({"map": {"9": "upper"}}, "source class 9 is outside the 7 classes"),
    ({"map": {"Head": "shoes"}}, "target class 'shoes' is not one of: background, upper, lower"),
    ({"labels": []}, "'labels' must be a non-empty list"),
    ({"palette": [[0, 0, 0]]}, "'palette' must list one [R, G, B] (0-255) per target class (3)"),
    ({"colours": 1}, "unknown key(s) 'colours'"),
])
def test_a_wrong_file_is_one_error_naming_it_and_the_problem(tmp_path, change, reason):
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps({**SCHEME, **change}))
    with pytest.raises(SetupError) as caught:
        load_label_map(path, PASCAL)
    assert str(caught.value).startswith(f"label_map={str(path)!r}: ") and reason in str(caught.value)
    assert caught.value.describe("--label-map").startswith(f"--label-map {path}: ")


def test_cli_refuses_a_bad_map_before_loading_the_model(run_cli, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    corpus.make_good_jpg(inputs)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SCHEME, "map": {"Hat": "upper"}}))
    code, _, err = run_cli("--model-restore", tmp_path / "missing.pth", "--input-dir", inputs,
                           "--output-dir", tmp_path / "out", "--label-map", bad)
    assert code == 2 and err.strip().splitlines() == [
        f"error: --label-map {bad}: source class 'Hat' is not one of: {', '.join(PASCAL)}"]
    assert not (tmp_path / "out").exists()


def test_folder_video_and_api_maps_are_the_plain_maps_through_the_table(small_model, run_cli, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    corpus.make_good_jpg(inputs)
    make_video(inputs / "clip.mp4", 3)
    scheme = tmp_path / "scheme.json"
    scheme.write_text(json.dumps(SCHEME))
    common = (*small_model, "--device", "cpu", "--input-dir", inputs, "--overlay")
    assert run_cli(*common, "--output-dir", tmp_path / "plain")[0] == 0
    code, _, err = run_cli(*common, "--output-dir", tmp_path / "mapped", "--label-map", scheme)
    assert code == 0, err
    table = np.array(TABLE, np.uint8)
    for name in ("good.png", "clip/frame_000000.png", "clip/frame_000002.png"):
        mode, plain, _ = read(tmp_path / "plain" / name)
        mode, mapped, palette = read(tmp_path / "mapped" / name)
        assert mode == "P" and len(np.unique(plain)) > 1, name  # a real map, not a blank one
        assert np.array_equal(mapped, table[plain]) and palette == [0, 0, 0, 250, 10, 10, 10, 10, 250], name
    from schp.api import SCHP
    checkpoint = small_model[-1]  # pascal's labels, in a checkpoint of train.py's kind
    plain_model = SCHP("custom", checkpoint, device="cpu")
    model = SCHP("custom", checkpoint, device="cpu", labels_map=SCHEME)
    image = np.asarray(Image.open(inputs / "good.jpg"))
    assert np.array_equal(model.parse(image, color="rgb"), table[plain_model.parse(image, color="rgb")])
    assert model.labels == ("background", "upper", "lower")
    assert np.array_equal(model.parse(image, color="rgb"), read(tmp_path / "mapped" / "good.png")[1])
    with pytest.raises(SetupError, match="label_map"):
        SCHP("custom", checkpoint, device="cpu", labels_map={"labels": ["a"], "map": {"Hat": "a"}})
