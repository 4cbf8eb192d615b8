#!/usr/bin/env python3
"""The two ONNX files a runtime backend can load, side by side in one run: the one for the input size
only (any batch; what a job without test-time scales exports) and the one for any crop size (any batch,
height and width; what a job with `--multi-scales` exports). For each: the seconds its export takes
(torch's exporter, then verification in ONNX Runtime, as the background export does), the seconds ONNX
Runtime and OpenVINO take to load and compile it, and their seconds per crop on it, the files
alternating within every round.

    python benchmarks/runtime_file.py [--rounds 5] [--batch 2] [--dataset pascal] [--json out.json]

Synthetic checkpoint in the released format; the files go to a temporary folder. Per-crop figures are
the median of `--rounds` timed batches after one warm-up batch per runner; run it on a quiet machine.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from schp.data.catalog import DATASETS  # noqa: E402  (no torch: --help stays fast)

KINDS = {"input size": False, "any size": True}  # name -> export_for_runtimes(any_size=...)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="timed batches per runner and file")
    p.add_argument("--batch", type=int, default=2, help="crops per batch (extract.py's default is 2)")
    p.add_argument("--dataset", default="pascal", choices=sorted(DATASETS))
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    import numpy as np
    import torch

    from schp.backends import OnnxRuntimeRunner, OpenVinoRunner, export_for_runtimes
    from schp.checkpoint import read_state_dict
    from throughput import make_checkpoint

    spec = DATASETS[a.dataset]
    h, w = spec.input_size
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch_threads": torch.get_num_threads(), "dataset": a.dataset, "input_size": [h, w],
              "batch": a.batch, "rounds": a.rounds, "export_seconds": {}, "seconds_per_crop": {}}
    with tempfile.TemporaryDirectory(prefix="schp-runtime-file-") as tmp:
        ckpt = Path(tmp) / "synthetic.pth"
        make_checkpoint(ckpt, a.dataset)
        state = read_state_dict(ckpt)
        files = {}
        for kind, any_size in KINDS.items():
            files[kind] = Path(tmp) / f"{kind.replace(' ', '-')}.onnx"
            t0 = time.perf_counter()
            export_for_runtimes(spec, state, files[kind], any_size=any_size)
            result["export_seconds"][kind] = round(time.perf_counter() - t0, 2)
            print(f"export, {kind}: {result['export_seconds'][kind]:.1f} s", flush=True)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((a.batch, 3, h, w), dtype=np.float32))
        runners = {}
        for runtime, make in (("onnxruntime", OnnxRuntimeRunner), ("openvino", OpenVinoRunner)):
            for kind in KINDS:
                t0, c0 = time.perf_counter(), time.process_time()
                runner = make(files[kind])
                runner.prepare(tuple(x.shape))  # the load and compile a job pays once per runtime
                load = (time.perf_counter() - t0, time.process_time() - c0)
                result.setdefault("load_seconds", {})[f"{runtime}, {kind}"] = {
                    "wall": round(load[0], 2), "cpu": round(load[1], 2)}
                print(f"load and compile, {runtime}, {kind}: {load[0]:.2f} s ({load[1]:.2f} s of CPU)", flush=True)
                runner(x)  # warm-up
                runners[runtime, kind] = runner
        times = {key: [] for key in runners}
        for _ in range(a.rounds):  # alternating, so that a drift of the machine's speed hits all alike
            for key, runner in runners.items():
                t0 = time.perf_counter()
                runner(x)
                times[key].append((time.perf_counter() - t0) / a.batch)
    print(f"\n{result['machine']}, torch threads {result['torch_threads']}, {a.dataset} {h} x {w}, "
          f"batch {a.batch}, median of {a.rounds}")
    print(f"{'':12} {'input size':>12} {'any size':>12} {'ratio':>7}")
    for runtime in ("onnxruntime", "openvino"):
        fixed, free = (statistics.median(times[runtime, kind]) for kind in KINDS)
        result["seconds_per_crop"][runtime] = {"input size": round(fixed, 4), "any size": round(free, 4)}
        print(f"{runtime:12} {fixed:10.3f} s {free:10.3f} s {fixed / free:7.3f}")
    fixed, free = result["export_seconds"].values()
    print(f"{'export':12} {fixed:10.1f} s {free:10.1f} s {fixed / free:7.3f}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
