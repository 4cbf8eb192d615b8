"""checkpoint.load_checkpoint: the one way the front doors and the trainer get a model's weights."""
import shutil
import socket

import pytest
import torch

from schp.checkpoint import (CheckpointError, label_facts, load_checkpoint, read_state_dict, spec_from_checkpoint,
                             write_model_checkpoint)
from schp.data.catalog import DATASETS, custom_spec

PASCAL = DATASETS["pascal"]


@pytest.fixture
def refused_network(monkeypatch):
    """Every download goes through a proxy port nobody listens on: refused at once, no traffic leaves."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    proxy = f"http://127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")


def test_no_checkpoint_means_the_released_file_in_the_default_folder(checkpoints, tmp_path, monkeypatch):
    shutil.copy(checkpoints("pascal"), tmp_path / PASCAL.checkpoint)
    monkeypatch.setenv("SCHP_CHECKPOINT_DIR", str(tmp_path))
    state, path = load_checkpoint(PASCAL, cache_dir=None)
    assert path == tmp_path / PASCAL.checkpoint
    released = read_state_dict(checkpoints("pascal"))
    assert state.keys() == released.keys() and torch.equal(state["fushion.3.weight"], released["fushion.3.weight"])


def test_only_the_released_file_name_is_downloaded(tmp_path, refused_network):
    with pytest.raises(CheckpointError, match="could not download the pascal checkpoint"):  # it tried
        load_checkpoint(PASCAL, tmp_path / PASCAL.checkpoint)
    with pytest.raises(CheckpointError, match=r"mine.pth: no such file \(the released pascal checkpoint is"):
        load_checkpoint(PASCAL, tmp_path / "mine.pth")
    with pytest.raises(CheckpointError, match="no such file"):  # asked not to
        load_checkpoint(PASCAL, tmp_path / PASCAL.checkpoint, allow_download=False)
    assert list(tmp_path.iterdir()) == []  # no partial file under any name


def test_another_datasets_checkpoint_is_refused_before_anything_is_cached(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="has 7 classes.*lip expects 20"):
        load_checkpoint(DATASETS["lip"], checkpoints("pascal"), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_fine_tuning_lets_only_the_classifier_heads_have_another_class_count(checkpoints):
    state, _ = load_checkpoint(custom_spec(4), checkpoints("pascal"), cache_dir=None, classes_may_differ=True)
    assert state["fushion.3.weight"].shape[0] == 7 and state["decoder.conv4.weight"].shape[0] == 7
    with pytest.raises(CheckpointError, match="has 7 classes"):
        load_checkpoint(custom_spec(4), checkpoints("pascal"), cache_dir=None)


def test_label_facts_the_trainer_writes_are_what_inference_reads_back(checkpoints, tmp_path):
    spec = custom_spec(7, ["bg", "a", "b", "c", "d", "e", "f"], (64, 48), ((1, 2),))
    released = read_state_dict(checkpoints("pascal"))
    path = tmp_path / "checkpoint_3.pth.tar"
    write_model_checkpoint(path, label_facts(spec, spec.flip_pairs), epoch=3,
                           state_dict={"module." + k: v for k, v in released.items()})
    try:
        back = spec_from_checkpoint(path)
        assert (back.labels, back.input_size, back.flip_pairs) == (spec.labels, (64, 48), ((1, 2),))
        state, got = load_checkpoint(back, path, cache_dir=None)
        assert got == path and state.keys() == released.keys()
    finally:
        path.unlink()
