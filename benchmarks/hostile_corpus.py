#!/usr/bin/env python3
"""A hostile corpus for every front door: bad images, labels, masks, detections, checkpoints, videos and
arrays; stop signals at start-up, mid-run and twice in a row; a full disk (a 20 MiB tmpfs when run as
root, else a file-size limit); unwritable and blocked folders. Each case runs the real command line and
checks the reliability contract of docs/reliability.md:

  * the exit code is the promised one (0 ok, 1 an input failed / full disk, 2 set-up, 130 interrupted);
  * no Python traceback, no C++ abort, no OpenCV `[ WARN` line on stderr;
  * no temporary (`.<name>.schp-tmp-...`) survives, and a failed set-up leaves no folder it made;
  * an interrupted run's manifest says so (never exit 0 with a manifest not marked interrupted).

    python benchmarks/hostile_corpus.py [--repeat 3] [--only NAME]

Prints one line per case and `N cases, M broken promises`; exits 1 if any promise is broken. It makes
every input in a temporary folder (synthetic checkpoints as tests/conftest.py makes them).
"""
import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))  # the training-state case writes its file with the project's own writer
PY = sys.executable
ENV = dict(os.environ, SCHP_BACKEND="torch", PYTHONPATH=str(ROOT))


def png_declaring(path: Path, width: int, height: int) -> Path:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def image(path: Path, seed: int = 0, size=(48, 64)) -> Path:
    import cv2
    import numpy as np
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))
    return path


class Corpus:
    """The inputs of every case, made once."""

    def __init__(self, root: Path):
        import cv2
        import numpy as np
        from synth_checkpoint import save_checkpoint, synthetic_checkpoint
        self.root = root
        self.lip = root / "lip.pth"
        save_checkpoint(synthetic_checkpoint("lip", 0), self.lip, legacy=True)
        self.bad_checkpoint = root / "bad.pth"
        self.bad_checkpoint.write_bytes(b"PK\x03\x04 not a checkpoint")
        self.photos = root / "photos"  # good and bad images, and bad videos
        self.photos.mkdir()
        for k in range(3):
            image(self.photos / f"good{k}.jpg", k)
        data = (self.photos / "good0.jpg").read_bytes()
        (self.photos / "cut.jpg").write_bytes(data[: len(data) // 2])
        (self.photos / "empty.png").write_bytes(b"")
        (self.photos / "text.png").write_text("<html>not an image</html>")
        png_declaring(self.photos / "bomb.png", 20000, 20000)
        png_declaring(self.photos / "side.png", 40000, 1)
        (self.photos / "junk.mp4").write_bytes(os.urandom(4000))
        writer = cv2.VideoWriter(str(self.photos / "zero.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25, (64, 48))
        writer.release()
        self.many = root / "many"  # a longer run, for signals mid-run
        self.many.mkdir()
        for k in range(8):
            image(self.many / f"{k}.jpg", k, (96, 128))
        self.blocker = root / "a-file"
        self.blocker.write_text("x")
        # labelled set: one good label, one declaring 20000 x 20000, one missing
        self.data = root / "data"
        (self.data / "val_segmentations").mkdir(parents=True)
        (self.data / "val_images").mkdir()
        self.pred = root / "pred"
        self.pred.mkdir()
        (self.data / "val_id.txt").write_text("good\nbomb\nmissing\n")
        label = np.zeros((48, 64), np.uint8)
        label[10:30, 10:40] = 1
        for name in ("good", "bomb", "missing"):
            image(self.data / "val_images" / f"{name}.jpg")
            cv2.imwrite(str(self.pred / f"{name}.png"), label)
        cv2.imwrite(str(self.data / "val_segmentations" / "good.png"), label)
        png_declaring(self.data / "val_segmentations" / "bomb.png", 20000, 20000)
        # multi-person: masks with a bomb, detections with NaN / inf
        self.masks = root / "masks"
        self.masks.mkdir()
        png_declaring(self.masks / "good0.png", 20000, 20000)
        self.detections = root / "detections.pth"
        self.detections.write_bytes(b"not a predictions file")
        # training: a good 4-class split, and one with a JPEG cut in half and a label declaring 20000 x 20000
        from tiny_parsing_data import make_dataset
        self.train = make_dataset(root / "train-good", 4, train=2)
        self.train_bad = make_dataset(root / "train-bad", 4, train=3)
        self.cut_jpeg = sorted((self.train_bad / "train_images").iterdir())[0]
        data = self.cut_jpeg.read_bytes()
        self.cut_jpeg.write_bytes(data[: len(data) // 2])
        self.bomb_label = sorted((self.train_bad / "train_segmentations").iterdir())[1]
        png_declaring(self.bomb_label, 20000, 20000)


def temporaries(*folders: Path):
    found = []
    for folder in folders:
        if Path(folder).exists():
            found += [str(p) for p in Path(folder).rglob(".*") if "tmp" in p.name]
    return found


def run(argv, timeout=600, signals=(), preexec=None):
    """(exit code, stderr) of a command line; `signals`: [(seconds after start, signum)]."""
    proc = subprocess.Popen([PY, *map(str, argv)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=ENV, cwd=ROOT, preexec_fn=preexec)
    start = time.monotonic()
    run.sent = 0  # signals delivered while the command still ran
    try:
        for at, signum in signals:
            time.sleep(max(0.0, at - (time.monotonic() - start)))
            if proc.poll() is None:
                proc.send_signal(signum)
                run.sent += 1
        err = proc.communicate(timeout=timeout)[1]
    finally:
        proc.kill()
    return proc.returncode, err


def contract(code, err, allowed, folders=(), absent=(), manifest=None):
    """The broken promises of one run (empty: kept)."""
    broken = []
    if code not in allowed:
        broken.append(f"exit {code}, promised {sorted(allowed)}")
    for bad in ("Traceback", "terminate called", "[ WARN", "Aborted", "core dumped"):
        if bad in err:
            broken.append(f"stderr has {bad!r}")
    left = temporaries(*folders)
    if left:
        broken.append(f"temporaries left: {left[:3]}")
    for path in absent:
        if Path(path).exists():
            broken.append(f"{path} left behind by a failed set-up")
    if manifest is not None and Path(manifest).is_file():
        record = json.loads(Path(manifest).read_text())
        if code == 0 and record.get("interrupted"):
            broken.append("exit 0 with a manifest marked interrupted")
        if code == 130 and not record.get("interrupted"):
            broken.append("exit 130 with a manifest not marked interrupted")
    if code == 0 and manifest is not None and "interrupt" in err:
        broken.append("interrupted, yet exit 0")
    return broken


def full_disk(root: Path, mib: int = 20):
    """(folder, preexec, cleanup): a `mib` MiB tmpfs when root, else a file-size limit of as much."""
    disk = root / f"disk{time.monotonic_ns()}"
    disk.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(disk)],
                                            capture_output=True).returncode == 0:
        return disk, None, lambda: subprocess.run(["umount", str(disk)])

    def limit():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (mib << 20, mib << 20))
    return disk, limit, lambda: None


def cases(c: Corpus, repeat: int):
    """(name, function returning broken promises) for every case."""
    x = [ROOT / "simple_extractor.py", "--dataset", "lip", "--model-restore", c.lip, "--quiet"]
    out = lambda name: c.root / "out" / name  # noqa: E731

    def extract_bad_inputs():
        code, err = run(x + ["--input-dir", c.photos, "--output-dir", out("bad"), "--summary", out("bad.json")])
        broken = contract(code, err, {1}, [out("bad")], [out("bad") / "junk", out("bad") / "zero"], out("bad.json"))
        record = json.loads(out("bad.json").read_text())
        failed = {Path(i["input"]).name for i in record["inputs"] if i["status"] == "failed"}
        want = {"cut.jpg", "empty.png", "text.png", "bomb.png", "side.png", "junk.mp4", "zero.mp4"}
        if failed != want:
            broken.append(f"failed {sorted(failed)}, expected {sorted(want)}")
        return broken

    def extract_signal(signals, name, allowed=frozenset({130})):
        def case():
            code, err = run(x + ["--input-dir", c.many, "--output-dir", out(name), "--num-workers", "2",
                                 "--summary", out(name + ".json")], signals=signals)
            if signals and run.sent == len(signals):  # delivered mid-run: the run must end interrupted
                allowed_now = {130}
            else:
                allowed_now = allowed
            return contract(code, err, allowed_now, [out(name)], manifest=out(name + ".json"))
        return case

    def extract_full_disk():
        disk, pre, cleanup = full_disk(c.root, 1)  # the logits of 8 images take 8 MiB
        try:
            code, err = run(x + ["--input-dir", c.many, "--output-dir", disk, "--logits"], preexec=pre)
            broken = contract(code, err, {1}, [disk])
            if code == 1 and "stopped" not in err:
                broken.append("full disk did not stop the run with a line")
            return broken
        finally:
            cleanup()

    def setup(argv, absent, name):
        def case():
            code, err = run(argv)
            broken = contract(code, err, {2}, absent=absent)
            if len([ln for ln in err.splitlines() if ln.startswith("error:")]) != 1:
                broken.append(f"{name}: not one error line: {err[-300:]!r}")
            return broken
        return case

    def evaluate_bomb_label():
        summary = out("eval.json")
        code, err = run([ROOT / "evaluate.py", "--dataset", "lip", "--data-dir", c.data, "--pred-dir", c.pred,
                         "--summary", summary, "--quiet"])
        broken = contract(code, err, {1})
        if not summary.is_file() or json.loads(summary.read_text())["images"] != 1:
            broken.append("the summary is missing or did not score the good image alone")
        return broken

    def export_signal(signum):
        def case():
            folder = out(f"export-{signum}")
            folder.mkdir(parents=True, exist_ok=True)
            code, err = run([ROOT / "export.py", "--dataset", "lip", "--model-restore", c.lip, "--format",
                             "torchscript", "--output", folder / "m.pt"], signals=[(6.0, signum)])
            return contract(code, err, {130}, [folder]) + ([f"left {os.listdir(folder)}"] if os.listdir(folder) else [])
        return case

    def export_full_disk(fmt):
        def case():
            disk, pre, cleanup = full_disk(c.root)
            try:
                code, err = run([ROOT / "export.py", "--dataset", "lip", "--model-restore", c.lip, "--format", fmt,
                                 "--no-verify", "--output", disk / f"m.{fmt}"], preexec=pre)
                left = os.listdir(disk)
            finally:
                cleanup()
            return contract(code, err, {1}) + ([f"left {left}"] if left else [])
        return case

    def train_check_data_bomb():
        code, err = run([ROOT / "train.py", "--dataset", "lip", "--data-dir", c.data, "--split", "val",
                         "--check-data", "--device", "cpu", "--log-dir", out("train")])
        broken = contract(code, err, {2}, absent=[out("train")])
        if "bomb.png" not in err:
            broken.append("the oversized label was not named")
        return broken

    t = [ROOT / "train.py", "--dataset", "custom", "--num-classes", "4", "--input-size", "64,64", "--batch-size",
         "2", "--imagenet-pretrain", "none", "--num-workers", "0", "--quiet", "--seed", "3", "--device", "cpu"]

    def train_check_data_split():
        log = out("train-check") / "log"
        code, err = run(t + ["--data-dir", c.train_bad, "--log-dir", log, "--check-data"])
        broken = contract(code, err, {2}, absent=[out("train-check")])
        for path, reason in ((c.cut_jpeg, "truncated JPEG"), (c.bomb_label, "above --max-pixels")):
            if not any(str(path) in ln and reason in ln for ln in err.splitlines() if ln.startswith("error:")):
                broken.append(f"{path.name} not named with {reason!r}")
        if "2 problem(s)" not in err:
            broken.append("no count of the problems")
        return broken

    def train_resume(what, argv, words):
        def case():
            log = out(f"train-resume-{what}") / "log"
            code, err = run(argv(log))
            broken = contract(code, err, {2}, absent=[log.parent])
            errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
            if len(errors) != 1 or words not in errors[0]:
                broken.append(f"not one line saying {words!r}: {err[-300:]!r}")
            return broken
        return case

    def lip_training_state():
        """A lip training state (20 classes) in train.py's own container, written by its writer."""
        path = c.root / "lip-last.pth.tar"
        if not path.is_file():
            import torch
            from schp.checkpoint import label_facts, write_training_state
            from schp.data.catalog import DATASETS
            from schp.networks import CE2P
            from schp.training.state import rng_state
            model = CE2P(20)
            write_training_state(path, label_facts(DATASETS["lip"], DATASETS["lip"].flip_pairs), epoch=1,
                                 cycle_n=0, model=model, schp_model=model,
                                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1), rng=rng_state(), seed=1,
                                 args={})
        return path

    def train_sigterm_mid_epoch():
        """SIGTERM once epoch 0's line is out (epoch 1 running): exit 130, no temporary; --resume ends 0."""
        log = out("train-term")
        argv = t + ["--data-dir", c.train, "--log-dir", log, "--epochs", "2", "--warmup-epochs", "0"]
        proc = subprocess.Popen([PY, *map(str, argv)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                env=ENV, cwd=ROOT)
        seen = []
        deadline = threading.Timer(600, proc.kill)  # the lines below wait on the process: bounded
        deadline.start()
        try:
            for line in proc.stderr:
                seen.append(line)
                if line.startswith("epoch 0:"):
                    time.sleep(1.0)
                    proc.send_signal(signal.SIGTERM)
                    break
            seen.append(proc.communicate(timeout=600)[1])
        finally:
            deadline.cancel()
            proc.kill()
        err = "".join(seen)
        broken = contract(proc.returncode, err, {130}, [log])
        code, err = run(argv + ["--resume"])
        broken += [f"resume: {b}" for b in contract(code, err, {0}, [log])]
        import torch
        if code == 0 and torch.load(log / "last.pth.tar", map_location="cpu", weights_only=True)["epoch"] != 2:
            broken.append("the resumed run did not finish epoch 2")
        for big in log.glob("*.pth.tar"):
            big.unlink()
        return broken

    def train_full_disk():
        disk, pre, cleanup = full_disk(c.root)
        try:
            code, err = run(t + ["--data-dir", c.train, "--log-dir", disk / "log", "--epochs", "1",
                                 "--eval-epochs", "1"], preexec=pre)
            broken = contract(code, err, {1}, [disk])
            if len([ln for ln in err.splitlines() if ln.startswith("error: cannot write")]) != 1:
                broken.append(f"not one line for the full disk: {err[-300:]!r}")
            return broken
        finally:
            cleanup()

    def multi_person_masks_bomb():
        folder = c.root / "mp-photos"
        folder.mkdir(exist_ok=True)
        image(folder / "good0.jpg")
        code, err = run([ROOT / "multi_person.py", "--input-dir", folder, "--output-dir", out("mp"),
                         "--instances", "masks", c.masks, "--device", "cpu",
                         "--global-restore", c.bad_checkpoint, "--local-restore", c.bad_checkpoint])
        return contract(code, err, {1, 2}, [out("mp")])

    def api_arrays():
        script = ("import numpy as np, sys; from schp.api import SCHP; from schp.errors import ParameterError\n"
                  f"m = SCHP('lip', checkpoint={str(c.lip)!r}, device='cpu')\n"
                  "bad = [np.zeros((1, 40000), np.uint8), np.zeros((1, 40000, 3), np.uint8), "
                  f"{str(c.photos / 'bomb.png')!r}, {str(c.photos / 'cut.jpg')!r}]\n"
                  "for b in bad:\n"
                  "    try: m.parse(b, color='bgr')\n"
                  "    except ValueError as e: print('refused:', e, file=sys.stderr)\n"
                  "    else: sys.exit(3)\n")
        code, err = run(["-c", script])
        broken = contract(code, err, {0})
        if err.count("refused:") != 4:
            broken.append(f"not every bad array refused with a sentence: {err[-300:]!r}")
        return broken

    yield "extract: bad images, labels-as-images, bombs, videos", extract_bad_inputs
    yield "extract: SIGTERM at start-up", extract_signal([(1.0, signal.SIGTERM)], "term-start")
    yield "extract: SIGHUP mid-run", extract_signal([(14.0, signal.SIGHUP)], "hup-mid", {130, 0})
    for k in range(repeat):  # item 8: never exit 0 with a manifest not marked interrupted
        at = 12.0 + 3.0 * k
        yield f"extract: double Ctrl-C 0.3 s apart, --num-workers 2 (try {k + 1}, at {at:.0f} s)", \
            extract_signal([(at, signal.SIGINT), (at + 0.3, signal.SIGINT)], f"int2-{k}", {130, 0})
    yield "extract: full disk", extract_full_disk
    yield "extract: output folder is a file", setup(x + ["--input-dir", c.photos, "--output-dir", c.blocker / "o"],
                                                    [], "extract")
    yield "extract: --summary under a file", setup(x + ["--input-dir", c.photos, "--output-dir", out("s1"),
                                                         "--summary", c.blocker / "run.json"], [out("s1")], "extract")
    yield "extract: not a checkpoint", setup([ROOT / "simple_extractor.py", "--dataset", "lip", "--model-restore",
                                              c.bad_checkpoint, "--input-dir", c.photos, "--output-dir",
                                              out("badckpt")], [out("badckpt")], "extract")
    yield "evaluate: a label declaring 20000 x 20000", evaluate_bomb_label
    yield "evaluate: --summary under a file", setup([ROOT / "evaluate.py", "--dataset", "lip", "--data-dir", c.data,
                                                     "--pred-dir", c.pred, "--summary", c.blocker / "m.json"], [],
                                                    "evaluate")
    yield "export: SIGTERM while tracing", export_signal(signal.SIGTERM)
    yield "export: SIGHUP while tracing", export_signal(signal.SIGHUP)
    for fmt in ("torchscript", "onnx", "exported-program"):
        yield f"export: full disk ({fmt})", export_full_disk(fmt)
    yield "export: not a checkpoint", setup([ROOT / "export.py", "--dataset", "lip", "--model-restore",
                                             c.bad_checkpoint, "--output", out("x.onnx")], [], "export")
    yield "multi-person: unreadable detections file", setup(
        [ROOT / "multi_person.py", "--input-dir", c.photos, "--output-dir", out("mp-det") / "deep",
         "--instances", "detectron2", c.detections, "--device", "cpu"], [out("mp-det")], "multi-person")
    yield "multi-person: --summary under a file", setup(
        [ROOT / "multi_person.py", "--input-dir", c.photos, "--output-dir", out("mp-s"), "--summary",
         c.blocker / "run.json"], [out("mp-s")], "multi-person")
    yield "multi-person: a mask declaring 20000 x 20000, bad models", multi_person_masks_bomb
    yield "train --check-data: a label declaring 20000 x 20000", train_check_data_bomb
    yield "train --check-data: a truncated JPEG and an oversized label in the train split", train_check_data_split
    yield "train --resume: a model checkpoint", train_resume(
        "model", lambda log: [ROOT / "train.py", "--dataset", "lip", "--data-dir", c.train, "--log-dir", log,
                              "--resume", c.lip, "--device", "cpu"], "is a model checkpoint, not a training state")
    yield "train --resume: another dataset's training state", train_resume(
        "other", lambda log: [ROOT / "train.py", "--dataset", "pascal", "--data-dir", c.train, "--log-dir", log,
                              "--resume", lip_training_state(), "--device", "cpu"],
        "is a lip training state (20 classes), but --dataset pascal (7 classes)")
    yield "train --resume: a truncated file", train_resume(
        "cut", lambda log: [ROOT / "train.py", "--dataset", "lip", "--data-dir", c.train, "--log-dir", log,
                            "--resume", c.bad_checkpoint, "--device", "cpu"], "--resume")
    yield "train: SIGTERM mid-epoch, then --resume", train_sigterm_mid_epoch
    yield "train: full disk while saving a checkpoint", train_full_disk
    yield "API: 1 x 40000 arrays, a bomb file, a cut JPEG", api_arrays


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="tries of the double Ctrl-C (default 3)")
    p.add_argument("--only", default=None, help="run the cases whose name contains this")
    args = p.parse_args()
    broken_total, count = 0, 0
    with tempfile.TemporaryDirectory(prefix="schp-hostile-") as folder:
        corpus = Corpus(Path(folder))
        (Path(folder) / "out").mkdir()
        for name, case in cases(corpus, args.repeat):
            if args.only and args.only not in name:
                continue
            count += 1
            started = time.perf_counter()
            try:
                broken = case()
            except Exception as err:  # the runner's own failure counts as a broken promise
                broken = [f"case failed: {type(err).__name__}: {err}"]
            broken_total += len(broken)
            status = "ok" if not broken else "BROKEN: " + "; ".join(broken)
            print(f"{time.perf_counter() - started:6.1f} s  {name}: {status}", flush=True)
    print(f"{count} cases, {broken_total} broken promises")
    return 1 if broken_total else 0


if __name__ == "__main__":
    sys.exit(main())
