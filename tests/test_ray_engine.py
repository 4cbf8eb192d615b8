"""The Ray engine (--engine ray) on real parts: a Ray cluster started here (`ray start --head` on
127.0.0.1, 2 CPUs, once for the module) and a local S3 server (moto's server mode on 127.0.0.1, a
free port). The maps are compared with the plain engine's on the same files; the faults are real
(kill -9 of the model actor's process, SIGTERM to the driver).

The small 160 x 160 checkpoint of service_server keeps each forward pass short (the same network
and pipeline as the released models, about ten times fewer operations than at 512 x 512).
"""
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import EXTRACTOR, ROOT, run_command, wait_until

ray = pytest.importorskip("ray", reason="the Ray extra (requirements-ray.txt) is not installed")
pytest.importorskip("s3fs", reason="the Ray extra (requirements-ray.txt) is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (requirements-test.txt) is not installed")

from service_server import free_port, small_checkpoint  # noqa: E402

# Ray resolves 127.0.0.1 to the machine's address unless told that this is a one-machine cluster;
# with it, the cluster's servers listen on the loopback interface only
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
os.environ.update(LOOPBACK)  # for this process too (read when ray is imported)
SIZES = [(48, 64), (64, 40), (37, 53), (80, 60)]  # (height, width): tiny, all different
ACTOR_TITLE = "ray::MapWorker(MapBatches(ModelActor))"


def write_images(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k, (h, w) in enumerate(SIZES):
        rng = np.random.default_rng(k)
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
        name = f"img{k}.{'png' if k % 2 else 'jpg'}"
        cv2.imwrite(str(folder / name), image)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 with 2 CPUs (its own temporary folder), stopped at the end: its address."""
    temp = Path(tempfile.mkdtemp(prefix="schp-ray-"))
    port = free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen([ray_cli, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
                             "--disable-usage-stats", "--temp-dir", str(temp)],
                            env={**os.environ, **LOOPBACK}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        import socket

        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        assert wait_until(listening, timeout=60, step=0.2), "the Ray head did not start"
        time.sleep(2)  # the raylet registers with the head just after
        yield {"address": f"127.0.0.1:{port}", "pid": proc.pid}
    finally:
        started = [p for p, _ in descendants(proc.pid)]
        proc.send_signal(signal.SIGTERM)  # --block: stops the processes this start made (gracefully: slow)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for pid in started:  # what is left of them, one by one
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        import shutil
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def s3():
    """A local S3 server (moto) on 127.0.0.1: its environment for clients, and an s3fs file system."""
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    try:
        yield env, fs
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def small(checkpoints, tmp_path_factory):
    return small_checkpoint(checkpoints("pascal"), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def plain(small, tmp_path_factory):
    """The images and the plain engine's outputs for them (in this process)."""
    from schp.runs.extract import parse_folder
    base = tmp_path_factory.mktemp("plain")
    names = write_images(base / "once")
    report = parse_folder(base / "once", base / "out", dataset="custom", checkpoint=small, backend="torch",
                          device="cpu", logits=True)
    assert report.count("processed") == len(names)
    # the Ray runs get each image twice (copy_<name>: the same maps), so that a run stopped or hit at
    # its first map still has work left on a fast machine
    (base / "in").mkdir()
    for name in names:
        for copy in (name, f"copy_{name}"):
            (base / "in" / copy).write_bytes((base / "once" / name).read_bytes())
    return base / "in", base / "out", names + [f"copy_{n}" for n in names]


def extractor(*args, cluster_address, env=None):
    return [*EXTRACTOR, "--engine", "ray", "--ray-address", cluster_address, "--dataset", "custom",
            "--backend", "torch", "--device", "cpu", "--quiet", *map(str, args)]


def descendants(root: int):
    """Processes below `root` (by parent id), as (pid, command line)."""
    parents, lines = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                lines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], {root}
    while frontier:
        children = {p for p, q in parents.items() if q in frontier}
        found += [(p, lines.get(p, "")) for p in children]
        frontier = children
    return found


def same_pixels(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


def assert_maps_equal_plain(read_bytes, plain_out: Path, names):
    for name in names:
        stem, original = Path(name).stem, Path(name).stem.removeprefix("copy_")
        ours = np.array(Image.open(io.BytesIO(read_bytes(f"{stem}.png"))))
        theirs = np.array(Image.open(plain_out / f"{original}.png"))
        assert same_pixels(ours, theirs) >= 0.9999, name
        logits = np.load(io.BytesIO(read_bytes(f"{stem}.npy")))
        np.testing.assert_allclose(logits, np.load(plain_out / f"{original}.npy"), rtol=1e-3, atol=1e-3)


def test_s3_run_stopped_by_sigterm_exits_130_and_the_rerun_resumes_to_the_plain_engines_maps(
        cluster, s3, small, plain, tmp_path):
    env, fs = s3
    plain_in, plain_out, names = plain
    fs.mkdir("bucket")
    for name in names:
        fs.put_file(str(plain_in / name), f"bucket/in/{name}")
    fs.pipe_file("bucket/in/broken.jpg", b"\xff\xd8 not a jpeg")
    fs.pipe_file("bucket/in/notes.txt", b"not an image")
    fs.pipe_file("bucket/in/sub/deeper.png", (plain_in / names[1]).read_bytes())  # not listed: no --recursive
    summary = tmp_path / "run.json"
    argv = extractor("--model-restore", small, "--input-dir", "s3://bucket/in", "--output-dir", "s3://bucket/out",
                     "--logits", "--overlay", "--summary", summary, cluster_address=cluster["address"])
    full_env = {**os.environ, **env, **LOOPBACK}
    two_actors = ["--ray-actors", "2", "--ray-cpus-per-actor", "0.5"]  # the first run; the resumed one has 1
    proc = subprocess.Popen(argv + two_actors, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def first_map():
        fs.invalidate_cache()
        return fs.exists("bucket/out") and any(k.endswith(".png") for k in fs.find("bucket/out"))
    try:
        assert wait_until(first_map, timeout=120, step=0.2), proc.stderr.read() if proc.poll() is not None else ""
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    record = json.loads(summary.read_text())
    assert record["interrupted"] is True and record["engine"] == "ray" and record["ray"]["actors"] == 2
    fs.invalidate_cache()
    for key in fs.find("bucket/out"):  # whatever is there is whole: it decodes
        data = fs.cat_file(key)
        if key.endswith(".png") or key.endswith(".jpg"):
            assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None, key
        else:
            np.load(io.BytesIO(data))
    written = set(fs.find("bucket/out"))  # an input counts as done only with all three of its files
    done_before = sum(all(f"bucket/out/{Path(n).stem}{suffix}" in written for suffix in (".png", ".npy", "_overlay.jpg"))
                      for n in names)

    again = subprocess.run(argv, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1, again.stderr  # the broken input, as the plain engine says it
    assert "error: s3://bucket/in/broken.jpg: truncated JPEG" in again.stderr
    record = json.loads(summary.read_text())
    assert record["totals"] == {"processed": len(names) - done_before, "skipped": done_before, "failed": 1,
                                "not-run": 0, "inputs": len(names) + 1}
    assert record["not_images"] == ["s3://bucket/in/notes.txt"]
    fs.invalidate_cache()
    expected = {f"bucket/out/{Path(n).stem}{suffix}" for n in names for suffix in (".png", ".npy", "_overlay.jpg")}
    assert set(fs.find("bucket/out")) == expected  # nothing else: no temporaries, no sub/, no broken.png
    assert_maps_equal_plain(lambda key: fs.cat_file(f"bucket/out/{key}"), plain_out, names)


def test_killed_model_actor_costs_a_retry_every_output_once_and_a_rerun_skips_without_ray(
        cluster, small, plain, tmp_path):
    plain_in, plain_out, names = plain
    out = tmp_path / "out"
    summary = tmp_path / "run.json"
    argv = extractor("--model-restore", small, "--input-dir", plain_in, "--output-dir", out, "--logits",
                     "--summary", summary, cluster_address=cluster["address"])
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **LOOPBACK}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def actor():
            if not (out.is_dir() and any(out.glob("*.png"))):
                return None
            found = [p for p, line in descendants(cluster["pid"]) if line.startswith(ACTOR_TITLE)]
            return found[0] if found else None
        assert wait_until(lambda: actor() is not None, timeout=120, step=0.1)
        os.kill(actor(), signal.SIGKILL)
        killed_at = len(list(out.glob("*.png")))
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert killed_at < len(names), "the run ended before the actor could be killed"
    record = json.loads(summary.read_text())
    assert record["totals"]["processed"] == len(names)
    expected = sorted(f"{Path(n).stem}{suffix}" for n in names for suffix in (".png", ".npy"))
    assert sorted(p.name for p in out.iterdir()) == expected  # each once; no temporaries
    assert_maps_equal_plain(lambda key: (out / key).read_bytes(), plain_out, names)

    # everything done: every input skipped, no cluster contacted (nothing listens on port 1), no model
    rerun = extractor("--model-restore", small, "--input-dir", plain_in, "--output-dir", out, "--logits",
                      "--summary", summary, cluster_address="127.0.0.1:1")
    t0 = time.monotonic()
    done = subprocess.run(rerun, cwd=ROOT, env={**os.environ, **LOOPBACK}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(summary.read_text())["totals"]["skipped"] == len(names)
    assert time.monotonic() - t0 < 60


def test_object_listing_follows_the_local_folder_rule(s3, tmp_path):
    """The same tree locally and in a bucket: the same images and other files, with and without
    --recursive, hidden folders and an output folder inside the input one left out."""
    from schp.data.listing import list_images
    from schp.runs.objects import list_url_images
    env, fs = s3
    fs.mkdir("listing")
    files = ["a.JPG", "b.png", "c.txt", "sub/d.webp", "sub/e.bin", ".hidden/f.jpg", "out/g.png", "sub/deep/h.tif"]
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
        fs.pipe_file(f"listing/tree/{rel}", b"x")
    for recursive in (False, True):
        local = list_images(tmp_path, recursive, exclude=tmp_path / "out")
        remote = list_url_images("s3://listing/tree", recursive, exclude="s3://listing/tree/out")[:2]
        assert [list(map(str, x)) for x in remote] == [list(map(str, x)) for x in local], recursive


def test_ray_engine_without_ray_says_which_package_to_install(tmp_path):
    """A missing ray is one line naming the package, exit 2 (ray hidden from this interpreter)."""
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    hide = "import sys; sys.modules['ray'] = None; sys.argv[1:] = {argv!r}; import runpy; " \
           "runpy.run_path({script!r}, run_name='__main__')"
    argv = ["--engine", "ray", "--input-dir", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out"), "--quiet"]
    done = subprocess.run([sys.executable, "-c", hide.format(argv=argv, script=EXTRACTOR[1])], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == \
        "error: the Ray engine needs the Python package ray[data] (pip install -r requirements-ray.txt)"


def test_urls_need_the_ray_engine():
    result = run_command("extract", "--input-dir", "s3://bucket/in", "--output-dir", "out")
    assert result.code == 2 and result.torch_imported is False
    assert result.err.strip() == \
        "error: --input-dir s3://bucket/in: a URL; object stores are read and written by --engine ray"


def test_ray_address_where_nothing_answers_is_a_setup_error_in_seconds(tmp_path):
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    t0 = time.monotonic()
    result = run_command("extract", "--engine", "ray", "--ray-address", "127.0.0.1:1", "--input-dir", tmp_path / "in",
                         "--output-dir", tmp_path / "out", "--quiet", env={**os.environ, **LOOPBACK})
    assert result.code == 2, result.err
    line = result.err.strip().splitlines()[-1]
    assert line.startswith("error: --ray-address 127.0.0.1:1: no Ray cluster answers there"), line
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
