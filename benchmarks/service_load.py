#!/usr/bin/env python3
"""Load test of the parsing service (serve.py) against the command line, on loopback, bounded.

In one run on this machine:

* the command line's steady-state images/s: ``simple_extractor.py`` (default options: one image a
  forward pass, one decoding worker) on N images and on 1 image, as subprocesses with the converted
  checkpoint already cached; images/s = (N - 1) / (T_N - T_1), so start-up and model loading cancel;
* the service: ``serve.py`` (same checkpoint, backend and device) on 127.0.0.1, then for each level of
  1, 4 and 16 concurrent clients (one httpx client per thread, keep-alive, each sending the images in
  turn as raw bodies, ?output=png), a fixed number of requests: requests/s (= images/s), p50 / p99
  latency, the mean images per forward pass, the server's peak RSS while loaded (sampled every 50 ms),
  the ratio of images/s to the command line's (the faster of its two runs, one before and
  one after the service's levels, as the machine may be shared), and whether every map equals the command line's PNG
  (byte for byte);
* 2x the queue limit: a second server with --max-queue 4 (--overload-queue), sent 8 requests at once: how many got 503 (with Retry-After)
  and 200, and /healthz afterwards.

The machine may be shared: each phase records the 1-minute load average and the share of the
machine's busy CPU time that was not ours (/proc/stat against our processes' CPU time).

Rerun from the repository root (about 5 minutes on 2 cores with the defaults; a synthetic Pascal
checkpoint unless --checkpoint is given; everything goes to a temporary folder removed at the end):

    python benchmarks/service_load.py --out service_load.json
    python benchmarks/service_load.py --checkpoint checkpoints/exp-schp-201908270938-pascal-person-part.pth

Exit status: 0 when it ran (whatever the figures), 2 on a setup error.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine_info():
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "repo_commit": commit or "unknown"}


class CpuWatch:
    """Busy CPU seconds of the whole machine vs those of the given processes (and their children)."""

    def __init__(self, pids=()):
        self.pids = list(pids)
        self.tick = os.sysconf("SC_CLK_TCK")
        self.start_busy, self.start_ours, self.t0 = self._busy(), self._ours(), time.monotonic()
        self.load0 = os.getloadavg()[0]

    def _busy(self):
        values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        return (sum(values[:8]) - values[3] - values[4]) / self.tick  # minus idle and iowait

    def _ours(self):
        total = 0.0
        for pid in [os.getpid()] + self.pids:
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                total += sum(int(v) for v in fields[11:15]) / self.tick  # utime stime cutime cstime
            except OSError:
                pass
        return total

    def result(self, extra_ours: float = 0.0):
        seconds = time.monotonic() - self.t0
        busy = self._busy() - self.start_busy
        ours = self._ours() - self.start_ours + extra_ours
        others = max(0.0, busy - ours)
        return {"seconds": round(seconds, 2), "load_1min_start": round(self.load0, 2),
                "load_1min_end": round(os.getloadavg()[0], 2),
                "others_cpu_share_of_machine": round(others / max(1e-9, seconds * os.cpu_count()), 3)}


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_images(folder: Path, count: int, width: int, height: int):
    import cv2
    folder.mkdir(parents=True)
    demo = cv2.imread(str(ROOT / "demo" / "demo.jpg"))
    h, w = demo.shape[:2]
    names = []
    for i in range(count):  # different crops and mirrors of the demo photo, as photos of a person
        x0, y0 = (i * 97) % (w // 4), (i * 53) % (h // 4)
        crop = demo[y0:y0 + 3 * h // 4, x0:x0 + 3 * w // 4]
        crop = crop[:, ::-1] if i % 2 else crop
        name = f"img_{i:03d}.jpg"
        cv2.imwrite(str(folder / name), cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        names.append(name)
    return names


def run_cli(model_args, inputs: Path, outputs: Path, env):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "simple_extractor.py", *model_args, "--input-dir", str(inputs),
                        "--output-dir", str(outputs), "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: the command line failed: {r.stderr.strip()[-500:]}")
    return time.monotonic() - t0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, max_batch, max_wait_ms, max_queue, env, log_path):
    """serve.py on a free loopback port, once /healthz answers: (process, url)."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "wb")
    server = subprocess.Popen([sys.executable, "serve.py", *model, "--host", "127.0.0.1", "--port", str(port),
                               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                               "--max-queue", str(max_queue), "--log-level", "warning"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"error: serve.py did not start: {Path(log_path).read_text()[-500:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)


def stop_server(server) -> int:
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(120)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait(30)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q / 100 * len(values) + 0.5)) - 1))]


def load_level(url, clients, requests, bodies, expected, pid):
    import httpx

    names = list(bodies)
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies, statuses, wrong = [], [], []
    peak = [rss_mib(pid)]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_mib(pid))

    def client(k):
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name = names[(i + k) % len(names)]
                t0 = time.perf_counter()
                r = http.post("/v1/parse?output=png", content=bodies[name])
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    statuses.append(r.status_code)
                    if r.status_code != 200 or r.content != expected[name]:
                        wrong.append((name, r.status_code))

    health0 = httpx.get(url + "/healthz").json()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    stop.set()
    health1 = httpx.get(url + "/healthz").json()
    batches = health1["batches"] - health0["batches"]
    return {"clients": clients, "requests": requests, "seconds": round(wall, 2),
            "requests_per_s": round(requests / wall, 3), "images_per_s": round(statuses.count(200) / wall, 3),
            "p50_s": round(percentile(latencies, 50), 3), "p99_s": round(percentile(latencies, 99), 3),
            "mean_images_per_forward_pass": round((health1["images"] - health0["images"]) / max(1, batches), 2),
            "peak_rss_mib": round(peak[0], 1), "maps_equal_to_cli": not wrong, "not_equal": wrong[:5]}


def overload(url, count, body):
    import httpx

    barrier = threading.Barrier(count)

    def one(_):
        with httpx.Client(base_url=url, timeout=600) as http:
            barrier.wait(60)
            t0 = time.perf_counter()
            r = http.post("/v1/parse?output=png", content=body)
            return r.status_code, r.headers.get("retry-after"), time.perf_counter() - t0

    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(one, range(count)))
    refused = [a for a in answers if a[0] == 503]
    health = httpx.get(url + "/healthz", timeout=10)
    return {"requests": count, "ok_200": sum(a[0] == 200 for a in answers), "refused_503": len(refused),
            "other": sorted({a[0] for a in answers} - {200, 503}),
            "retry_after_values": sorted({a[1] for a in refused}),
            "slowest_503_s": round(max((a[2] for a in refused), default=0), 3),
            "healthz_after": health.status_code, "healthz_status": health.json().get("status")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: a synthetic Pascal one, released format)")
    p.add_argument("--dataset", default="pascal")
    p.add_argument("--backend", default="torch", help="for the command line and the service alike")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=8, help="distinct images")
    p.add_argument("--size", default="640x427", help="image size WxH")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    p.add_argument("--requests", default="8,16,32", help="requests per level (bounded load)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-wait-ms", type=float, default=10)
    p.add_argument("--max-queue", type=int, default=32, help="queue of the server under load (>= the clients)")
    p.add_argument("--overload-queue", type=int, default=4, help="queue of the second server, sent 2x that at once")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]
    counts = [int(v) for v in args.requests.split(",")]
    if len(levels) != len(counts) or args.images < 2:
        p.error("--levels and --requests need as many values; --images >= 2")
    width, height = (int(v) for v in args.size.split("x"))
    try:
        import httpx  # noqa: F401
    except ImportError:
        print("error: the benchmark needs the package 'httpx'", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="schp-service-load-"))
    env = {**os.environ, "SCHP_CACHE_DIR": os.environ.get("SCHP_CACHE_DIR", str(work / "cache"))}
    server = None
    try:
        checkpoint = args.checkpoint
        if checkpoint is None:
            sys.path.insert(0, str(ROOT / "tests" / "data"))
            from synth_checkpoint import save_checkpoint, synthetic_checkpoint
            checkpoint = work / "synth-pascal.pth"
            save_checkpoint(synthetic_checkpoint(args.dataset, 0), checkpoint, legacy=True)
        model = ["--dataset", args.dataset, "--model-restore", str(checkpoint), "--backend", args.backend,
                 "--device", args.device]
        names = make_images(work / "in", args.images, width, height)
        one = work / "one"
        one.mkdir()
        shutil.copy(work / "in" / names[0], one / names[0])
        results = {"machine": machine_info(), "options": vars(args), "image_size": [width, height]}
        print(f"{results['machine']['cpu']}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}",
              file=sys.stderr)

        run_cli(model, one, work / "warm", env)  # fills the checkpoint cache (and any export)
        watch = CpuWatch()
        t1 = run_cli(model, one, work / "out1", env)
        tn = run_cli(model, work / "in", work / "out", env)
        cli_rate = (len(names) - 1) / (tn - t1)
        results["cli"] = {"images": len(names), "seconds_1": round(t1, 2), "seconds_n": round(tn, 2),
                          "images_per_s": round(cli_rate, 3), **watch.result()}
        print(f"command line: {cli_rate:.3f} images/s ({len(names)} images {tn:.1f} s, 1 image {t1:.1f} s)",
              file=sys.stderr)
        expected = {n: (work / "out" / n).with_suffix(".png").read_bytes() for n in names}
        bodies = {n: (work / "in" / n).read_bytes() for n in names}

        import httpx
        server, url = start_server(model, args.max_batch, args.max_wait_ms, args.max_queue, env, work / "server.log")
        for n in names[:2]:  # warm-up
            httpx.post(url + "/v1/parse", content=bodies[n], timeout=600)
        results["service"] = []
        for clients, requests in zip(levels, counts):
            watch = CpuWatch([server.pid])
            row = load_level(url, clients, requests, bodies, expected, server.pid)
            row.update(watch.result())
            row["ratio_to_cli_before"] = round(row["images_per_s"] / cli_rate, 3)
            results["service"].append(row)
            print(f"{clients:3d} clients: {row['images_per_s']:.3f} images/s = {row['ratio_to_cli_before']:.2f}x the command "
                  f"line's first run, p50 {row['p50_s']:.2f} s, p99 {row['p99_s']:.2f} s, {row['mean_images_per_forward_pass']} "
                  f"images/forward, RSS {row['peak_rss_mib']:.0f} MiB, maps equal: {row['maps_equal_to_cli']}, "
                  f"others' CPU {row['others_cpu_share_of_machine']:.0%}", file=sys.stderr)
        results["server_exit_code"] = stop_server(server)
        server = None

        # the command line again: the machine is shared, so the ratios use the faster of its two runs
        watch = CpuWatch()
        t1b = run_cli(model, one, work / "out1b", env)
        tnb = run_cli(model, work / "in", work / "outb", env)
        rate_b = (len(names) - 1) / (tnb - t1b)
        results["cli_after"] = {"seconds_1": round(t1b, 2), "seconds_n": round(tnb, 2),
                                "images_per_s": round(rate_b, 3), **watch.result()}
        best = max(cli_rate, rate_b)
        results["cli_images_per_s_best"] = round(best, 3)
        for row in results["service"]:
            row["ratio_to_cli"] = round(row["images_per_s"] / best, 3)
        print(f"command line again: {rate_b:.3f} images/s; ratios against the faster, {best:.3f}: "
              + ", ".join(f"{r['clients']} clients {r['ratio_to_cli']:.2f}x" for r in results["service"]),
              file=sys.stderr)

        # 2x the queue limit, on a server with a small queue
        small_queue = args.overload_queue
        server, url = start_server(model, args.max_batch, args.max_wait_ms, small_queue, env, work / "server2.log")
        over = overload(url, 2 * small_queue, bodies[names[0]])
        over["max_queue"] = small_queue
        over["server_alive"] = server.poll() is None
        results["overload_2x_queue"] = over
        print(f"2x the queue ({over['requests']} at once, --max-queue {small_queue}): {over['ok_200']} x 200, "
              f"{over['refused_503']} x 503 (Retry-After {over['retry_after_values']}, slowest 503 in "
              f"{over['slowest_503_s']} s), /healthz {over['healthz_after']} {over['healthz_status']}", file=sys.stderr)
        results["server2_exit_code"] = stop_server(server)
        server = None
        text = json.dumps(results, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
