"""The parsing service against its real parts: serve.py on uvicorn in a subprocess on a loopback port,
an HTTP client (httpx, and raw sockets for the hostile bodies), and the command line's own outputs for
the same files as the reference (simple_extractor.py run as a user runs it)."""
import base64
import io
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

import corpus
from conftest import ROOT
from service_server import Server, run_extractor, small_checkpoint

GOOD = ("a.jpg", "b.png", "c.bmp", "d.webp")
BAD = ("truncated.jpg", "data.png")
MAX_BYTES = 300_000
MAX_PIXELS = 1_000_000


def make_inputs(folder):
    folder.mkdir()
    demo = cv2.imread(str(ROOT / "demo" / "demo.jpg"))
    cv2.imwrite(str(folder / "a.jpg"), cv2.resize(demo, (64, 48), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(folder / "b.png"), cv2.resize(demo, (48, 64), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(folder / "c.bmp"), corpus.base_bgr(64, 48))
    cv2.imwrite(str(folder / "d.webp"), cv2.resize(demo[40:, 10:], (72, 54), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(folder / "tiny.png"), corpus.base_bgr(64, 48)[:1, :1])  # 1 x 1: a zero-size box
    corpus.make_truncated_jpg(folder)
    corpus.make_text_as_png(folder)


@pytest.fixture(scope="module")
def svc(tmp_path_factory, checkpoints):
    """One server (batches of up to 8, queue 64, --logits) and the command line's outputs of the same files."""
    root = tmp_path_factory.mktemp("service")
    checkpoint = small_checkpoint(checkpoints("pascal"), root)
    make_inputs(root / "in")
    spool = root / "server-tmp"  # the server's TMPDIR: must stay empty (no request leaves a file)
    spool.mkdir()
    server = Server(checkpoint, "custom", root / "server.log", "--max-batch", 8, "--max-wait-ms", 50,
                    "--max-queue", 64, "--max-bytes", MAX_BYTES, "--max-pixels", MAX_PIXELS, "--logits",
                    env={"TMPDIR": str(spool)})
    try:
        code, err = run_extractor(checkpoint, "custom", root / "in", root / "out", "--overlay", "--logits")
        assert code == 1, err  # the two bad files fail, one line each
        reasons = dict(re.findall(r"^error: .*/([^/]+?): (.*)$", err, re.M))
        assert sorted(reasons) == sorted(BAD), err
        server.wait_ready()
        yield SimpleNamespace(server=server, url=server.url, root=root, inputs=root / "in", out=root / "out",
                              reasons=reasons, spool=spool, checkpoint=checkpoint)
    finally:
        server.stop()


def cli_png(svc, name):
    return (svc.out / name).with_suffix(".png").read_bytes()


def png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "P"
        return np.array(image)


def test_sixteen_clients_four_images_each_get_the_command_lines_maps(svc):
    expected = {name: cli_png(svc, name) for name in GOOD}
    maps = {name: png_array(data) for name, data in expected.items()}
    assert len({int(v) for m in maps.values() for v in np.unique(m)}) >= 3  # maps with several classes
    before = httpx.get(svc.url + "/healthz").json()
    files = {name: (svc.inputs / name).read_bytes() for name in GOOD}
    start = threading.Barrier(16)

    def client(k):
        results = []
        with httpx.Client(base_url=svc.url, timeout=120) as http:
            start.wait(30)
            for j in range(4):
                name = GOOD[(k + j) % 4]
                if (k + j) % 2:  # half the requests as multipart, half as a raw body
                    r = http.post("/v1/parse", files={"image": (name, files[name])})
                else:
                    r = http.post("/v1/parse?output=png", content=files[name])
                results.append((name, r.status_code, r.headers.get("content-type"), r.content))
        return results

    with ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(client, range(16)) for r in rs]
    assert len(results) == 64
    for name, status, kind, body in results:
        assert status == 200 and kind == "image/png", (name, status, body[:200])
        assert np.array_equal(png_array(body), maps[name]), name
        assert body == expected[name], name  # the command line's bytes, too
    after = httpx.get(svc.url + "/healthz").json()
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == 64 and batches < images / 2, after  # gathered: more than 2 images a forward pass


def test_json_overlay_and_npy_outputs_match_the_command_lines_files(svc):
    name = "a.jpg"
    data = (svc.inputs / name).read_bytes()
    labels = png_array(cli_png(svc, name))
    body = httpx.post(svc.url + "/v1/parse?output=json", content=data, timeout=60).json()
    assert base64.b64decode(body["png_base64"]) == cli_png(svc, name)
    assert (body["width"], body["height"]) == (64, 48) and body["labels"][0] == "Background"
    counts = np.bincount(labels.ravel(), minlength=7)
    assert {c["index"]: c["pixels"] for c in body["classes"]} == {i: int(n) for i, n in enumerate(counts) if n}
    for c in body["classes"]:
        ys, xs = np.nonzero(labels == c["index"])
        assert c["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert c["name"] == body["labels"][c["index"]]
    overlay = httpx.post(svc.url + "/v1/parse?output=overlay", content=data, timeout=60)
    assert overlay.headers["content-type"] == "image/jpeg"
    assert overlay.content == (svc.out / "a_overlay.jpg").read_bytes()
    npy = httpx.post(svc.url + "/v1/parse?output=npy", files={"image": (name, data)}, timeout=60)
    logits = np.load(io.BytesIO(npy.content))
    expected = np.load(svc.out / "a.npy")
    assert logits.shape == expected.shape == (48, 64, 7) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    assert np.array_equal(logits.argmax(2), labels)


def test_labels_and_openapi(svc):
    body = httpx.get(svc.url + "/v1/labels").json()
    from schp.utils.palette import class_colors
    assert [entry["name"] for entry in body["labels"]][:3] == ["Background", "Head", "Torso"]
    assert [tuple(entry["rgb"]) for entry in body["labels"]] == [tuple(c) for c in class_colors(7)]
    schema = httpx.get(svc.url + "/openapi.json").json()
    assert {"/healthz", "/v1/labels", "/v1/parse"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/v1/parse"]["post"]["requestBody"]["content"]
    assert httpx.get(svc.url + "/docs").status_code == 200
    page = httpx.get(svc.url + "/")
    assert page.status_code == 200 and "app.js" in page.text
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)  # nothing from another host


def raw_request(port: int, head: bytes, chunks=(), read_timeout: float = 5.0):
    """Send a request head and body pieces on a socket; (status, headers+body text, seconds) of the answer.

    Stops sending as soon as the server answers or closes (a refused body is never read whole)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        s.setblocking(False)
        answer = b""
        for chunk in chunks:
            try:
                answer += s.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            try:
                s.sendall(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break
        s.setblocking(True)
        s.settimeout(read_timeout)
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                piece = s.recv(65536)
                if not piece:
                    break
                answer += piece
        except (socket.timeout, ConnectionResetError):
            pass
    text = answer.decode("latin-1")
    return int(text.split(" ", 2)[1]), text, time.monotonic() - t0


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height and whose data is a few bytes: refused unread."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_hostile_requests_get_their_status_quickly_and_the_server_stays_healthy(svc):
    port = svc.server.port
    # a body declared too large: 413 from its Content-Length, before any of it is read
    status, text, seconds = raw_request(port, b"POST /v1/parse HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                              b"Content-Length: 100000000\r\n\r\n", [b"\xff" * 65536] * 8)
    assert status == 413 and "--max-bytes 300000" in text and seconds < 1, (text, seconds)
    # a chunked body without a length: counted while it streams, refused once past the limit
    chunk = b"%x\r\n%s\r\n" % (65536, b"\xff" * 65536)
    status, text, seconds = raw_request(port, b"POST /v1/parse HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                                        [chunk] * 64)  # 4 MiB offered, 300 kB allowed
    assert status == 413 and "larger than --max-bytes" in text and seconds < 1, (text, seconds)

    def post(content, path="/v1/parse", **kw):
        t0 = time.monotonic()
        r = httpx.post(svc.url + path, content=content, timeout=30, **kw)
        return r, time.monotonic() - t0

    # a header declaring 400 megapixels in a 100-byte file: 413 before decoding
    r, seconds = post(huge_png_header(20000, 20000))
    assert r.status_code == 413 and "20000 x 20000 pixels" in r.json()["detail"] and seconds < 1, r.text
    r, seconds = post(huge_png_header(40000, 10))  # few pixels, a side beyond OpenCV's warp
    assert r.status_code == 413 and "32766" in r.json()["detail"] and seconds < 1, r.text
    # damaged files: 422 with the command line's reason for the same file
    for name in BAD:
        r, seconds = post((svc.inputs / name).read_bytes())
        assert r.status_code == 422 and r.json()["detail"] == svc.reasons[name] and seconds < 1, (name, r.text)
    r, seconds = post(b"")
    assert r.status_code == 422 and "empty" in r.json()["detail"] and seconds < 1
    r, _ = post((svc.inputs / "tiny.png").read_bytes())
    assert r.status_code == 200 and r.content == cli_png(svc, "tiny.png")
    # malformed requests: 400 naming the problem
    r, _ = post(None, files={"picture": ("a.jpg", b"abc")})
    assert r.status_code == 400 and "'image'" in r.json()["detail"]
    r, _ = post(b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code in (400, 422), r.text
    r, _ = post(b"abc", path="/v1/parse?output=bmp")
    assert r.status_code == 400 and "png, overlay, json, npy" in r.json()["detail"]
    status, text, _ = raw_request(port, b"POST /v1/parse HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nabc")
    assert status == 400, text
    # a client that disconnects half way through its body
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/parse HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"\xff" * 100)
    # still healthy, still right, and nothing written to its temporary folder
    health = httpx.get(svc.url + "/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    r = httpx.post(svc.url + "/v1/parse", files={"image": ("b.png", (svc.inputs / "b.png").read_bytes())},
                   timeout=60)
    assert r.status_code == 200 and r.content == cli_png(svc, "b.png")
    assert list(svc.spool.iterdir()) == []
    assert svc.server.proc.poll() is None
    assert "Traceback" not in svc.server.stderr()


def test_token_full_queue_and_sigterm_drain(svc, tmp_path):
    """A second server: a queue of 2, a token, and a forward pass that waits 3 s for a batch of 4 that
    a queue of 2 can never fill, so what is queued stays queued long enough to be seen, on any
    machine. 6x the queue's worth of concurrent requests gets 503s with Retry-After and maps for the
    rest; SIGTERM answers those in flight, refuses new ones and exits 0."""
    token = "s3cret-token"
    server = Server(svc.checkpoint, "custom", tmp_path / "server.log", "--max-batch", 4, "--max-wait-ms", 3000,
                    "--max-queue", 2, "--token", token, "--drain-timeout", 60).wait_ready()
    auth = {"Authorization": f"Bearer {token}"}
    data = (svc.inputs / "a.jpg").read_bytes()
    expected = cli_png(svc, "a.jpg")
    try:
        assert httpx.get(server.url + "/healthz").json()["token_required"] is True
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            t0 = time.monotonic()
            r = httpx.post(server.url + "/v1/parse", content=data, headers=headers, timeout=10)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert time.monotonic() - t0 < 1
        assert httpx.get(server.url + "/v1/labels").status_code == 401
        assert httpx.get(server.url + "/v1/labels", headers=auth).status_code == 200
        r = httpx.post(server.url + "/v1/parse?output=npy", content=data, headers=auth, timeout=10)
        assert r.status_code == 403 and "--logits" in r.json()["detail"]

        # 6x the queue limit at once: 2 are queued (and wait 3 s for companions), the other 10 refused
        n = 12
        start = threading.Barrier(n)

        def one(_):
            start.wait(30)
            return httpx.post(server.url + "/v1/parse", content=data, headers=auth, timeout=120)

        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(one, range(n)))
        refused = [r for r in answers if r.status_code == 503]
        served = [r for r in answers if r.status_code == 200]
        assert len(refused) + len(served) == n and len(refused) >= n - 2 - 2, [r.status_code for r in answers]
        assert served and all(r.content == expected for r in served)
        assert all(int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["detail"] for r in refused)
        assert httpx.get(server.url + "/healthz").json()["status"] == "ok"

        # SIGTERM with two requests in flight: both answered, a new connection refused, exit 0
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(httpx.post, server.url + "/v1/parse", content=data, headers=auth, timeout=120)
                       for _ in range(2)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                health = httpx.get(server.url + "/healthz").json()
                if health["queued"] + health["in_forward_pass"] == 2:
                    break
                time.sleep(0.01)
            assert health["queued"] + health["in_forward_pass"] == 2, health
            t0 = time.monotonic()
            server.proc.send_signal(15)
            late = None
            for _ in range(50):  # within a few seconds the listening socket is gone
                time.sleep(0.1)
                try:
                    late = httpx.post(server.url + "/v1/parse", content=data, headers=auth, timeout=5)
                except httpx.ConnectError:
                    late = "refused"
                    break
            answers = [f.result(60) for f in futures]
        assert late == "refused", late
        assert [r.status_code for r in answers] == [200] * 2 and all(r.content == expected for r in answers)
        assert server.proc.wait(60) == 0
        assert time.monotonic() - t0 < 60
        log = server.stderr()
        assert "Traceback" not in log and log.rstrip().endswith("stopped"), log
    finally:
        server.stop()


def test_setup_errors_are_one_line_and_exit_2(tmp_path, svc):
    def serve(*argv, code=None):
        args = [sys.executable, "-c", code] if code else [sys.executable, "serve.py"]
        r = subprocess.run(args + list(argv), cwd=ROOT, capture_output=True, text=True, timeout=120)
        return r.returncode, r.stderr

    t0 = time.monotonic()
    code, err = serve("--max-batch", "0")
    assert code == 2 and err.strip() == "error: --max-batch must be >= 1 (--help lists the options)"
    code, err = serve("--device", "tpu")
    assert code == 2 and err.count("\n") == 1 and "--device tpu" in err
    assert time.monotonic() - t0 < 30
    # the port of the running server: refused before any model is loaded
    t0 = time.monotonic()
    code, err = serve("--port", str(svc.server.port), "--model-restore", str(svc.checkpoint), "--dataset", "custom")
    assert code == 2 and f"error: cannot listen on 127.0.0.1:{svc.server.port}: Address already in use" in err, err
    # a public address without a token warns; a missing checkpoint is one line
    code, err = serve("--host", "0.0.0.0", "--port", "0", "--model-restore", str(tmp_path / "none.pth"))
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("warning: --host 0.0.0.0") and "--token" in lines[0], err
    assert lines[-1].startswith("error: ") and "none.pth" in lines[-1], err
    # FastAPI missing: one line naming it
    code, err = serve("--port", "0", code="import sys; sys.modules['fastapi'] = None; "
                                          "from schp.commands.serve import main; sys.exit(main(sys.argv[1:]))")
    assert code == 2 and err.strip().startswith("error: the service needs the package 'fastapi'"), err


def test_batched_forward_passes_give_each_image_its_batch_of_one_logits(checkpoints):
    """At the released 512 x 512 input, a batch's logits for an image equal, to the bit, those of the
    image alone (the command line's default): the service's maps (and the extractor's with
    --batch-size) do not depend on batch-mates. The network does it (PSPModule.forward); the
    service's model call is the parser's own on the CPU."""
    from schp.data.catalog import DATASETS
    from schp.api import load_parser
    from schp.service.engine import batch_invariant_parse

    parser, _ = load_parser(DATASETS["pascal"], checkpoints("pascal"), "cpu", backend="torch")
    demo = cv2.imread(str(ROOT / "demo" / "demo.jpg"))
    images = [cv2.resize(demo[i * 50:, i * 70:], (160, 107), interpolation=cv2.INTER_AREA) for i in range(3)]
    alone = [parser.parse([image], with_logits=True)[0] for image in images]
    assert batch_invariant_parse(parser) == parser.parse
    batched = parser.parse(images, with_logits=True)
    for (labels, logits), (labels_b, logits_b) in zip(alone, batched):
        assert np.array_equal(logits, logits_b) and np.array_equal(labels, labels_b)
