"""Export and runtimes: the exact PSP pooling, ONNX files run by ONNX Runtime the way re-hosting
pipelines run them, TorchScript and torch.export reloads, and the --backend switch end to end.

Every network is the real CE2P/ResNet-101 with a synthetic checkpoint in the released container; the
reference is the torch path (HumanParser), itself checked against the original by test_golden.py.
Exports are slow, so each dataset is exported once per module (lip at 473 raw, atr at 512 labels, pascal
at 512 through the backend cache).
"""
import dataclasses
import json
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import onnx_input_dims, wait_until
from schp.api import dataset_spec
from schp.backends import resolve_backend
from schp.commands import export as export_cli
from schp.data.catalog import DATASETS
from schp.data.crop import prepare_image
from schp.export import torchscript_asked_for
from schp.networks.ce2p import BinAverage
from schp.checkpoint import read_state_dict
from schp.errors import ParameterError
from schp.inference import HumanParser, labels_from_logits

CPU = torch.device("cpu")


def person_like(seed: int, height: int, width: int) -> np.ndarray:
    """A BGR picture the project has never seen: a shaded figure of ellipses and limbs on a gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([(40 + 80 * xx / width), (60 + 60 * yy / height), np.full((height, width), 90.0)], -1)
    cx = width / 2 + rng.uniform(-0.05, 0.05) * width
    color = lambda: tuple(int(v) for v in rng.integers(20, 235, 3))  # noqa: E731
    cv2.ellipse(img, (int(cx), int(0.15 * height)), (int(0.07 * width), int(0.08 * height)), 0, 0, 360, color(), -1)
    cv2.rectangle(img, (int(cx - 0.13 * width), int(0.25 * height)), (int(cx + 0.13 * width), int(0.6 * height)),
                  color(), -1)
    for side in (-1, 1):
        cv2.line(img, (int(cx + side * 0.13 * width), int(0.27 * height)),
                 (int(cx + side * 0.3 * width), int(0.55 * height)), color(), max(2, width // 20))
        cv2.line(img, (int(cx + side * 0.06 * width), int(0.6 * height)),
                 (int(cx + side * 0.1 * width), int(0.95 * height)), color(), max(2, width // 14))
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def run_export(capsys, *argv):
    code = export_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """export(dataset, *options) -> (path, stdout) of one module-wide export per set of arguments."""
    folder = tmp_path_factory.mktemp("exports")
    made = {}

    def get(dataset, *options):
        key = (dataset,) + options
        if key not in made:
            path = folder / f"{dataset}-{len(made)}.{'pt2' if 'exported-program' in options else 'onnx'}"
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("SCHP_CACHE_DIR", str(folder / "cache"))
                code = export_cli.main(["--dataset", dataset, "--model-restore", str(checkpoints(dataset)),
                                        "--output", str(path), *options])
            assert code == 0
            made[key] = path
        return made[key]

    return get


@pytest.fixture(scope="module")
def parsers(checkpoints):
    """parsers(dataset) -> the torch-path HumanParser of the synthetic checkpoint (one per module)."""
    made = {}

    def get(dataset):
        if dataset not in made:
            made[dataset] = HumanParser(DATASETS[dataset], read_state_dict(checkpoints(dataset)), CPU)
        return made[dataset]

    return get


# ------------------------------------------------------------------------------------------- PSP pooling
@pytest.mark.parametrize("height, width", [(60, 60), (64, 64), (32, 32), (30, 30), (119, 97), (7, 11),
                                           (5, 3), (1, 1)])
def test_bin_average_equals_adaptive_average_pooling(height, width):
    x = torch.randn(2, 64, height, width, generator=torch.Generator().manual_seed(height * 1000 + width)) * 3
    for size in (1, 2, 3, 6):
        torch.testing.assert_close(BinAverage(size)(x), torch.nn.AdaptiveAvgPool2d(size)(x), rtol=0, atol=1e-6)


def test_bin_average_uses_overlapping_bins_where_the_size_does_not_divide():
    x = torch.arange(5.0).reshape(1, 1, 1, 5).expand(1, 1, 3, 5)
    # 3 bins over 5: [0, 2), [1, 4), [3, 5) -> means 0.5, 2, 3.5
    assert BinAverage(3)(x)[0, 0, 0].tolist() == [0.5, 2.0, 3.5]


# ------------------------------------------------------------------------------------------- ONNX, raw
def test_raw_onnx_runs_as_try_on_pipelines_call_it(exported, parsers):
    """LIP at 473: session.run(None, {'input.1': x}), output[1] upsampled with align_corners=True,
    inverse-warped and argmaxed gives the extractor's maps and logits."""
    import onnxruntime

    path = exported("lip", "--dynamic-batch")
    parser, spec = parsers("lip"), DATASETS["lip"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input.1"]
    assert session.get_inputs()[0].type == "tensor(float)"
    assert session.get_inputs()[0].shape[1:] == [3, 473, 473]
    assert [o.name for o in session.get_outputs()] == ["parsing", "fusion", "edge"]

    images = [person_like(1, 300, 180), person_like(2, 200, 260)]
    items = [prepare_image(i, img, spec.input_size) for i, img in enumerate(images)]
    crops = torch.from_numpy(np.stack([it.image for it in items]))
    x = parser.normalize(crops).numpy().astype(np.float32)
    output = session.run(None, {"input.1": x})
    assert [o.shape for o in output] == [(2, 20, 119, 119), (2, 20, 119, 119), (2, 2, 119, 119)]
    upsampled = F.interpolate(torch.from_numpy(output[1]), size=spec.input_size, mode="bilinear",
                              align_corners=True)
    reference = parser.logits(crops)
    rel = float((upsampled - reference).abs().max() / reference.abs().max())
    assert rel < 1e-4
    assert float((upsampled.argmax(1) == reference.argmax(1)).double().mean()) >= 0.9999
    expected = parser.parse(images)
    for k, item in enumerate(items):
        logits = upsampled[k].permute(1, 2, 0).numpy()
        got = labels_from_logits(logits, item.center, item.scale, item.width, item.height, spec.input_size)
        assert got.shape == expected[k].shape
        assert (got == expected[k]).mean() >= 0.9999


def test_export_cli_prints_the_verification_and_refuses_what_a_format_cannot_hold(checkpoints, tmp_path, capsys):
    code, _, err = run_export(capsys, "--dataset", "lip", "--model-restore", checkpoints("lip"),
                              "--output", tmp_path / "x.onnx", "--precision", "bf16")
    assert code == 2
    assert err.strip().splitlines() == [
        "error: --precision bf16 is not available for --format onnx (it supports fp32, fp16)"]
    assert not list(tmp_path.glob("*.onnx"))


# ------------------------------------------------------------------------------------------- ONNX, labels
def test_labels_output_is_the_extractors_crop_space_argmax(exported, parsers):
    """ATR at 512, argmax in the graph: N x H x W int64 equal to argmax of HumanParser.logits."""
    import onnxruntime

    path = exported("atr", "--outputs", "labels", "--dynamic-batch")
    parser, spec = parsers("atr"), DATASETS["atr"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["labels"]
    crop = prepare_image(0, person_like(3, 240, 200), spec.input_size).image
    crops = torch.from_numpy(crop[None])
    (labels,) = session.run(None, {"input.1": parser.normalize(crops).numpy()})
    assert labels.dtype == np.int64 and labels.shape == (1, 512, 512)
    expected = parser.logits(crops).argmax(1).numpy()
    assert (labels == expected).mean() >= 0.9999


# ------------------------------------------------------------------------------------------- torch formats
@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_torch_formats_reload_and_agree(fmt, exported, parsers, capsys):
    path = exported("lip", "--format", fmt)
    assert "argmax agreement" in capsys.readouterr().out
    parser, spec = parsers("lip"), DATASETS["lip"]
    crops = torch.from_numpy(prepare_image(0, person_like(4, 120, 90), spec.input_size).image[None])
    x = parser.normalize(crops)
    with torch.inference_mode():
        with torchscript_asked_for():
            module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
        parsing, fusion, edge = module(x)
    assert parsing.shape == fusion.shape == (1, 20, 119, 119) and edge.shape == (1, 2, 119, 119)
    upsampled = F.interpolate(fusion, size=spec.input_size, mode="bilinear", align_corners=True)
    reference = parser.logits(crops)
    assert float((upsampled - reference).abs().max() / reference.abs().max()) < 1e-4


def test_a_train_py_checkpoint_exports_with_the_label_set_it_holds(small_model, tmp_path, capsys):
    """--dataset custom: classes and input size come from the checkpoint, as for the extractor."""
    out = tmp_path / "mine.ts"
    code, stdout, err = run_export(capsys, *small_model, "--output", out, "--format", "torchscript")
    assert code == 0, err
    assert "exporting custom" in err and "input 1 x 3 x 160 x 160" in err and "argmax agreement" in stdout
    with torch.inference_mode(), torchscript_asked_for():
        parsing, fusion, edge = torch.jit.load(str(out))(torch.zeros(1, 3, 160, 160))
    assert parsing.shape == fusion.shape == (1, 7, 40, 40) and edge.shape == (1, 2, 40, 40)
    code, _, err = run_export(capsys, "--dataset", "custom", "--output", tmp_path / "none.onnx")
    assert code == 2
    assert err.strip() == "error: --dataset custom needs --model-restore (a checkpoint written by train.py)"


def test_a_file_that_does_not_verify_is_removed_with_exit_1(checkpoints, tmp_path, capsys, monkeypatch):
    import schp.export

    monkeypatch.setitem(schp.export.TOLERANCES, "fp32", (-1.0, 1.0))  # nothing can pass this
    out = tmp_path / "bad.ts"
    code, _, err = run_export(capsys, "--dataset", "pascal", "--model-restore", checkpoints("pascal"),
                              "--output", out, "--format", "torchscript")
    assert code == 1
    assert "does not reproduce PyTorch" in err and "nothing was written" in err
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []  # neither file nor temporary


# ------------------------------------------------------------------------------------------- backends
def test_backend_switch_end_to_end_on_a_folder(small_model, run_cli, tmp_path, capsys, monkeypatch):
    """pascal's weights at 160 (the run's mechanics; the network is the same at any input size): the same
    folder through torch, onnxruntime (exports once into the cache) and openvino (reuses that file); maps
    agree; flipping runs through the same file (test-time scales, which need the file that takes any
    size, are covered by the multi-person backend test)."""
    monkeypatch.setenv("SCHP_CACHE_DIR", str(tmp_path / "cache"))  # a cache of its own: count its exports
    images = tmp_path / "in"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), person_like(5, 220, 160))
    cv2.imwrite(str(images / "b.jpg"), person_like(6, 150, 210))
    maps = {}
    # auto, 2 images: far too short to repay the export, so torch runs it and nothing is exported; even
    # with the file cached (by the onnxruntime run), loading it costs more than 2 images gain
    for run, backend, ran in (("auto-empty", "auto", "torch"), ("torch", "torch", "torch"),
                              ("onnxruntime", "onnxruntime", "onnxruntime"), ("openvino", "openvino", "openvino"),
                              ("auto-cached", "auto", "torch")):
        out = tmp_path / run
        code, _, err = run_cli(*small_model, "--input-dir", images, "--output-dir", out, "--backend", backend,
                               "--batch-size", "2", "--summary", tmp_path / f"{run}.json")
        assert code == 0, err
        assert ("exporting the custom network" in err) == (run == "onnxruntime")
        maps[run] = [np.array(Image.open(out / f"{n}.png")) for n in ("a", "b")]
        summary = json.loads((tmp_path / f"{run}.json").read_text())
        assert summary["backend"] == ran and summary["crops_by_backend"] == {ran: 2}
        if run == "auto-empty":
            assert not (tmp_path / "cache" / "exports").exists()
    (cached,) = (tmp_path / "cache" / "exports").glob("custom-160x160-*.onnx")
    assert onnx_input_dims(cached) == ["N", 3, 160, 160]  # any batch; the input size only (no test-time scales)
    assert all((a == b).all() for a, b in zip(maps["auto-empty"], maps["torch"]))
    for backend in ("onnxruntime", "openvino", "auto-cached"):
        for got, expected in zip(maps[backend], maps["torch"]):
            assert (got == expected).mean() >= 0.9999, backend

    spec, state = dataset_spec("custom", small_model[-1]), read_state_dict(small_model[-1])
    crops = torch.from_numpy(prepare_image(0, person_like(7, 100, 100), spec.input_size).image[None])
    reference = HumanParser(spec, state, CPU, flip=True).logits(crops)
    got = HumanParser(spec, state, CPU, backend="openvino", flip=True).logits(crops)
    assert float((got - reference).abs().max() / reference.abs().max()) < 1e-4
    assert len(list((tmp_path / "cache" / "exports").iterdir())) == 1  # no other file for the flip
    # crops of another size are refused (a runtime's file takes the input size only), by torch's too
    other = torch.from_numpy(prepare_image(0, person_like(8, 90, 90), (96, 96)).image[None])
    with pytest.raises(ParameterError) as refused:
        HumanParser(spec, state, CPU).logits(other)
    assert str(refused.value) == "batch='crops of 96 x 96': expected crops of the input size 160 x 160"


def test_a_missing_runtime_is_a_one_line_setup_error(checkpoints, run_cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), person_like(8, 40, 30))
    code, _, err = run_cli("--dataset", "pascal", "--model-restore", checkpoints("pascal"),
                           "--input-dir", tmp_path / "in", "--output-dir", tmp_path / "out", "--backend", "openvino")
    assert code == 2
    assert err.strip().splitlines() == [
        "error: --backend openvino: needs the package 'openvino', which is not installed "
        "(pip install -r requirements-runtimes.txt)"]
    assert not (tmp_path / "out" / "a.png").exists()


def test_auto_backend_is_the_fastest_installed_on_the_cpu_and_torch_elsewhere(monkeypatch):
    from schp.utils.cpu import avx2_without_avx512

    avx512, avx2 = frozenset({"avx2", "avx512f"}), frozenset({"avx2", "fma"})
    assert resolve_backend("auto", CPU, "fp32", avx512) == "openvino"
    assert resolve_backend("auto", CPU, "fp32", avx2) == "onnxruntime"  # as measured on an AVX2-only CPU
    assert resolve_backend("auto", CPU) == ("onnxruntime" if avx2_without_avx512() else "openvino")  # this one
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("auto", CPU, "bf16", frozenset({"avx2", "avx512f", "avx512_bf16"})) == "openvino"
    assert resolve_backend("auto", CPU, "bf16", avx2) == "torch"  # emulated bf16
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert resolve_backend("auto", CPU, "fp32", avx512) == "onnxruntime"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert resolve_backend("auto", CPU, "fp32", avx512) == resolve_backend("auto", CPU, "fp32", avx2) == "torch"


def test_auto_exports_only_for_a_job_that_repays_it_or_uses_the_cached_file(checkpoints, tmp_path, monkeypatch):
    from schp.backends import (AUTO_CACHED_MIN_FORWARDS, AUTO_EXPORT_MIN_FORWARDS, AUTO_TRIAL_MIN_FORWARDS,
                               export_path, export_repays, network_runner)

    cache = tmp_path / "cache"
    monkeypatch.setenv("SCHP_CACHE_DIR", str(cache))
    spec, state = DATASETS["pascal"], read_state_dict(checkpoints("pascal"))
    need = AUTO_EXPORT_MIN_FORWARDS["fp32"]
    assert not export_repays(spec, state, "fp32", cache, need - 1)
    assert export_repays(spec, state, "fp32", cache, need)
    assert export_repays(spec, state, "fp32", cache, None)  # a job of unknown length counts as long
    # a short job with flips and scales: images x 2 x scales forward passes
    parser = HumanParser(spec, state, CPU, backend="auto", expected_images=1, flip=True, scales=(0.75, 1.0))
    assert parser.backend == "torch" and parser.model is not None and parser.background is None
    assert not cache.joinpath("exports").exists()
    path = export_path(spec, state, cache)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # where the cached export would be: then a shorter job takes the runtime
    assert export_repays(spec, state, "fp32", cache, AUTO_CACHED_MIN_FORWARDS)
    assert not export_repays(spec, state, "fp32", cache, AUTO_CACHED_MIN_FORWARDS - 1)
    # the other installed runtime is timed against the first only for a long job (or one of unknown length)
    first = resolve_backend("auto", CPU)
    other = {"onnxruntime": "openvino", "openvino": "onnxruntime"}[first]
    for forwards, rivals in ((AUTO_CACHED_MIN_FORWARDS, ()), (AUTO_TRIAL_MIN_FORWARDS - 1, ()),
                             (AUTO_TRIAL_MIN_FORWARDS, (other,)), (None, (other,))):
        backend, runner, plan = network_runner("auto", CPU, spec, state, cache_dir=cache, forwards=forwards)
        assert (backend, runner, plan.backend, plan.rivals) == ("torch", None, first, rivals), forwards


def test_auto_starts_on_torch_and_switches_once_the_background_export_is_ready(checkpoints, tmp_path, monkeypatch):
    """A long job (unknown length) on an empty cache: the first forward pass runs on torch at once, the
    export runs in a child process beside it, and the next forward pass after it is ready runs on the
    runtime the table puts first for this CPU; the file lands in the cache, nothing else is left there,
    and the maps agree with torch's. Both runtimes are installed, so the other loads from the same file
    once torch's network is let go, and the two are timed on the job's next forward passes, two turns
    each: the table's first, made 0.5 s slower per call here, loses, and the other runs from then on. The service's model call then gives each image of a
    batch its own call."""
    import time

    import schp.background_runtime
    from schp.backends import export_path
    from schp.service.engine import batch_invariant_parse

    runtime = resolve_backend("auto", CPU)  # this CPU's first (openvino with AVX-512, onnxruntime with AVX2)
    rival = {"onnxruntime": "openvino", "openvino": "onnxruntime"}[runtime]
    load_runner = schp.background_runtime.load_runner

    class Slowed:
        def __init__(self, runner):
            self.runner = runner

        def prepare(self, shape):
            self.runner.prepare(shape)

        def __call__(self, x):
            time.sleep(0.5)
            return self.runner(x)

    loaded = []  # (backend, whether torch's network was still held when it loaded)

    def load(backend, *args):
        loaded.append((backend, parser.model is not None))
        runner = load_runner(backend, *args)
        return Slowed(runner) if backend == runtime else runner

    monkeypatch.setattr(schp.background_runtime, "load_runner", load)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCHP_CACHE_DIR", str(cache))
    # pascal's network at 160 x 160: the switch is the same at any input size, each forward a tenth of 512's
    spec = dataclasses.replace(DATASETS["pascal"], input_size=(160, 160))
    state = read_state_dict(checkpoints("pascal"))
    images = [person_like(11, 240, 170), person_like(12, 180, 230)]
    reference = HumanParser(spec, state, CPU).parse(images)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    parser = HumanParser(spec, state, CPU, backend="auto")
    first = parser.parse(images[:1])[0]
    first_seconds = time.perf_counter() - t0
    assert parser.backend == "torch" and parser.background is not None and parser.background.started
    assert np.array_equal(first, reference[0])  # torch's own map, before any export
    assert parser.wait_for_backend(timeout=600) == runtime, parser.background and parser.background.error
    assert loaded == [(runtime, True), (rival, False)]  # never torch's network and two runtimes at once
    assert time.perf_counter() - t0 > first_seconds  # the export came after the first map, not before it
    assert torch.get_num_threads() == threads  # the core torch left to the export is given back
    assert parser.model is None and parser.background is None
    assert [p.name for p in (cache / "exports").iterdir()] == [export_path(spec, state, cache).name]
    after = parser.parse(images)
    assert parser.crops_by_backend == {"torch": 1, runtime: 2}
    ran = [runtime]
    for _ in range(4):  # three more turns of the trial, then the decision
        for got, expected in zip(after, reference):
            assert (got == expected).mean() >= 0.9999, ran[-1]
        after = parser.parse(images)
        ran.append(parser.backend)
    assert ran == [runtime, rival, runtime, rival, rival] and parser.trial is None
    assert parser.crops_by_backend == {"torch": 1, runtime: 4, rival: 6}
    parse = batch_invariant_parse(parser)
    assert parse is not parser.parse
    assert all(np.array_equal(a, b) for a, b in zip(parse(images), [parser.parse([i])[0] for i in images]))


def test_the_runtime_trial_compares_turns_per_crop_and_keeps_the_best_turn():
    """Turns alternate, two each; a turn with no forward pass yet goes on; a turn's time is per crop of the
    input size, over its forward passes (two batches of 4 crops in 1.2 s beat two of one crop in 0.5 s);
    each runtime's best turn counts (a first call's set-up is not held against it)."""
    from schp.background_runtime import RuntimeTrial

    crop = 3 * 8 * 8
    trial = RuntimeTrial({"onnxruntime": "ort", "openvino": "ov"}, crop)
    assert trial.next_turn() == "onnxruntime" and trial.next_turn() == "onnxruntime"  # nothing ran yet
    for name, seconds, crops in (("onnxruntime", 3.0, 1), ("openvino", 0.5, 1), ("onnxruntime", 1.2, 4),
                                 ("openvino", 0.6, 1)):
        assert trial.current == name
        trial.record(seconds / 2, crops * crop)  # two forward passes of half the batch each
        trial.record(seconds / 2, crops * crop)
        trial.next_turn()
    assert trial.current is None and trial.seconds == {"onnxruntime": [1.5, 0.15], "openvino": [0.25, 0.3]}
    assert trial.fastest() == "onnxruntime"
    assert trial.describe() == "onnxruntime 0.150 s, openvino 0.250 s"


def test_closing_the_parser_stops_a_background_export_and_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    """A job that ends (or is stopped) before the export is done: close() stops the child, which removes
    its partial file; the weights it was handed are gone too; torch goes on, with all its threads."""
    import time

    cache = tmp_path / "cache"
    monkeypatch.setenv("SCHP_CACHE_DIR", str(cache))
    spec, state = DATASETS["pascal"], read_state_dict(checkpoints("pascal"))
    image = person_like(13, 200, 150)
    parser = HumanParser(spec, state, CPU, backend="auto", expected_images=1000)
    threads = torch.get_num_threads()
    reference = parser.parse([image])[0]
    background = parser.background
    assert wait_until(lambda: background.exporting, timeout=60, step=0.05)
    child = background._child
    time.sleep(3)  # into the export itself, past the child's start-up
    parser.close()
    assert not child.running and not background.exporting  # its process has ended
    assert parser.background is None and parser.backend == "torch" and torch.get_num_threads() == threads
    assert list((cache / "exports").iterdir()) == []
    assert np.array_equal(parser.parse([image])[0], reference)


def test_a_parser_dropped_without_close_stops_its_background_work(checkpoints, tmp_path, monkeypatch):
    """Losing the last reference to an auto parser (an API object let go) stops its export child and ends
    its set-up thread, which would otherwise run on, or wait for a switch that never comes while holding
    a loaded runtime; the export leaves no file."""
    import gc

    cache = tmp_path / "cache"
    monkeypatch.setenv("SCHP_CACHE_DIR", str(cache))
    spec = dataclasses.replace(DATASETS["pascal"], input_size=(160, 160))
    parser = HumanParser(spec, read_state_dict(checkpoints("pascal")), CPU, backend="auto")
    parser.parse([person_like(15, 200, 150)])
    background = parser.background
    assert wait_until(lambda: background.exporting, timeout=60, step=0.05)
    child = background._child
    del parser
    gc.collect()
    assert not child.running and not background.thread.is_alive()
    assert list((cache / "exports").iterdir()) == []


def test_a_background_export_that_fails_leaves_the_job_on_torch_with_a_warning(checkpoints, tmp_path, monkeypatch):
    from schp.errors import SCHPWarning

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "exports").write_text("not a folder")  # where the export would go
    monkeypatch.setenv("SCHP_CACHE_DIR", str(cache))
    spec, state = DATASETS["pascal"], read_state_dict(checkpoints("pascal"))
    image = person_like(14, 160, 160)
    parser = HumanParser(spec, state, CPU, backend="auto")
    reference = parser.parse([image])[0]
    assert parser.background.wait(120)
    runtime = resolve_backend("auto", CPU)
    with pytest.warns(SCHPWarning, match=rf"^backend='auto': {runtime} unusable \(.*exports.*\); running the network "
                                         r"with torch$"):
        assert np.array_equal(parser.parse([image])[0], reference)
    assert parser.backend == "torch" and parser.background is None
    assert parser.crops_by_backend == {"torch": 2}
