"""Checkpoint reading: released container and variants accepted, everything else refused clearly."""
import os
import pickle
import zipfile

import pytest
import torch

from schp.data.catalog import DATASETS
from schp.networks import build_ce2p
from schp.checkpoint import CheckpointError, cache_size_cap, cached_zip_copy, check_state_dict, read_state_dict

PASCAL = DATASETS["pascal"]


def expected_state():
    return build_ce2p(7).state_dict()


def test_released_legacy_container_loads(checkpoints):
    path = checkpoints("pascal", legacy=True)
    assert not zipfile.is_zipfile(path)  # the released, pre-1.6 format with cuda:0 storages
    state = read_state_dict(path)
    assert len(state) == 603 and not any(k.startswith("module.") for k in state)
    check_state_dict(state, expected_state(), PASCAL, path)


@pytest.mark.parametrize("wrap, prefix", [(True, False), (False, True), (False, False)])
def test_bare_state_dicts_with_or_without_prefix_load(checkpoints, tmp_path, wrap, prefix):
    state = read_state_dict(checkpoints("pascal"))
    stored = {("module." if prefix else "") + k: v for k, v in state.items()}
    path = tmp_path / "variant.pth"
    torch.save({"state_dict": stored} if wrap else stored, path)
    loaded = read_state_dict(path)
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["fushion.3.bias"], state["fushion.3.bias"])


def test_zip_copy_is_made_once_and_loads_memory_mapped(checkpoints, tmp_path):
    legacy = checkpoints("pascal")
    copy = cached_zip_copy(legacy, tmp_path / "cache")
    assert copy != legacy and zipfile.is_zipfile(copy)
    assert cached_zip_copy(legacy, tmp_path / "cache") == copy
    a, b = read_state_dict(legacy), read_state_dict(copy)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cached_zip_copy(legacy, None) == legacy


def test_lip_checkpoint_with_pascal_dataset_names_lip(checkpoints):
    path = checkpoints("lip")
    with pytest.raises(CheckpointError, match=r"20 classes.*looks like a lip checkpoint.*--dataset pascal"):
        check_state_dict(read_state_dict(path), expected_state(), PASCAL, path)


def test_wrong_architecture_lists_missing_and_misshaped_keys(tmp_path):
    state = dict(expected_state())
    del state["layer3.22.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 3, 7, 7)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(state, expected_state(), PASCAL, tmp_path / "x.pth")
    message = str(err.value)
    assert "1 missing: layer3.22.conv1.weight" in message
    assert "1 unexpected: extra.weight" in message
    assert "conv1.weight: checkpoint (64, 3, 7, 7) vs model (64, 3, 3, 3)" in message
    assert "\n" not in message


@pytest.mark.parametrize("cut", [0.5, 0.999])
@pytest.mark.parametrize("legacy", [True, False])
def test_truncated_file_is_refused(checkpoints, tmp_path, legacy, cut):
    data = checkpoints("pascal", legacy=legacy).read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="cut.pth: .*(truncated|not a readable)"):
        read_state_dict(path)


def test_empty_and_foreign_files_are_refused(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(tmp_path / "empty.pth")
    (tmp_path / "page.pth").write_text("<html>Google Drive quota exceeded</html>")
    with pytest.raises(CheckpointError, match="page.pth"):
        read_state_dict(tmp_path / "page.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "absent.pth")
    torch.save({"state_dict": {"a": 1}}, tmp_path / "nontensor.pth")
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        read_state_dict(tmp_path / "nontensor.pth")


class Payload:
    """Unpickling this runs os.system: what a hostile checkpoint would do under plain torch.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [True, False])
def test_checkpoint_whose_pickle_runs_code_is_refused_without_running_it(tmp_path, legacy):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "hostile.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=r"hostile.pth: refused: its pickle asks for code .*posix.system.*nothing from it was executed"):
        read_state_dict(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the same file loaded unrestricted does run its payload
    assert marker.exists(), "the test file is not actually hostile"


def test_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError):
        read_state_dict(path)
    assert not marker.exists()


def test_missing_released_checkpoint_without_network_fails_fast_with_url_and_path(run_cli, tmp_path,
                                                                                 monkeypatch):
    import time

    from PIL import Image

    # a proxy that refuses every connection: a real network failure on any machine, online or not
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("RGB", (8, 8)).save(inputs / "a.png")
    target = tmp_path / "ckpts" / PASCAL.checkpoint
    start = time.monotonic()
    code, _, err = run_cli("--model-restore", target, "--input-dir", inputs, "--output-dir", tmp_path / "out")
    assert time.monotonic() - start < 30
    assert code == 2
    assert PASCAL.url in err and str(target) in err
    # the network failure itself, not a TypeError from a gdown too old for the arguments we pass
    assert "cannot reach drive.google.com" in err, err
    assert not target.exists() and list(target.parent.iterdir()) == []  # no partial download left


def test_unwritable_cache_falls_back_to_the_original_file(checkpoints, tmp_path):
    legacy = checkpoints("pascal")
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    assert cached_zip_copy(legacy, tmp_path / "cache") == legacy
    assert read_state_dict(legacy).keys() == read_state_dict(cached_zip_copy(legacy, tmp_path / "cache")).keys()


@pytest.mark.parametrize("content, reason", [
    ("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>\n",
     "not a PyTorch checkpoint (it looks like an HTML page"),
    ("\n  <html>Google Drive quota exceeded</html>", "not a PyTorch checkpoint (it looks like an HTML page"),
    ("Too many users have viewed or downloaded this file recently.\n", "not a PyTorch checkpoint (it is a text file)"),
])
def test_html_or_text_saved_as_a_checkpoint_is_named_for_what_it_is(tmp_path, content, reason):
    path = tmp_path / PASCAL.checkpoint
    path.write_text(content)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path}: ") and reason in message
    assert "pickle" not in message and "code" not in message


def test_wrong_dataset_checkpoint_is_refused_before_any_conversion(checkpoints, run_cli, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCHP_CACHE_DIR", str(cache))
    inputs = tmp_path / "in"
    inputs.mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(inputs / "a.png")
    code, _, err = run_cli("--model-restore", checkpoints("lip"), "--input-dir", inputs,
                           "--output-dir", tmp_path / "out")
    assert code == 2 and "looks like a lip checkpoint" in err
    assert not cache.exists() or list(cache.iterdir()) == []  # nothing converted, nothing cached


def small_legacy(path, n):
    torch.save({"state_dict": {"module.w": torch.arange(n, dtype=torch.float32)}}, path,
               _use_new_zipfile_serialization=False)
    return path


def test_cache_evicts_the_least_recently_used_copies_beyond_its_cap(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    sources = [small_legacy(tmp_path / f"c{i}.pth", 25_000) for i in range(4)]  # ~100 kB each
    copies = []
    for i, source in enumerate(sources[:3]):
        copies.append(cached_zip_copy(source, cache, max_bytes=10**9))
        os.utime(copies[-1], ns=(10**18 + i * 10**9, 10**18 + i * 10**9))  # c0 oldest ... c2 newest
    size = copies[0].stat().st_size
    assert sorted(cache.iterdir()) == sorted(copies)
    assert cached_zip_copy(sources[0], cache) == copies[0]  # a hit makes c0 the most recent
    newest = cached_zip_copy(sources[3], cache, max_bytes=int(2.5 * size))
    assert sorted(p.name for p in cache.iterdir()) == sorted([copies[0].name, newest.name])
    assert read_state_dict(newest)["w"].shape == (25_000,)
    # the copy in use stays even when it alone exceeds the cap
    assert cached_zip_copy(sources[1], cache, max_bytes=1).is_file()
    assert len(list(cache.iterdir())) == 1
    monkeypatch.setenv("SCHP_CACHE_MAX_MIB", "0.5")
    assert cache_size_cap() == 2**19
    monkeypatch.delenv("SCHP_CACHE_MAX_MIB")
    assert cache_size_cap() == 2048 * 2**20
