#!/usr/bin/env python3
"""bf16 against fp32 on the CPU, with this CPU's bf16 units and without them.

The extractor warns when `--precision bf16` runs on a CPU without bf16 units (no avx512_bf16 / amx_bf16
flag), because there bf16 is slower than fp32. This measures why, on one machine: the folded network's
forward pass (synthetic pascal weights, random input, channels-last, as HumanParser runs it) in fp32 and
under bf16 autocast, once as the CPU is, and once with oneDNN and ATen limited to AVX2
(ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2), which is how an AVX2-only CPU runs. Each variant
runs in its own process; fp32 and bf16 alternate, best of --repeats each.

    python benchmarks/bf16_cpu.py [--size 512] [--repeats 3]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from schp.networks import build_ce2p, fold_abn
torch.manual_seed(0)
with torch.device("meta"):
    model = build_ce2p(7)
model = model.to_empty(device="cpu")
for p in model.parameters():
    torch.nn.init.normal_(p, std=0.02)
for name, b in model.named_buffers():
    b.fill_(1.0 if "var" in name else 0.0)
model = fold_abn(model).eval().to(memory_format=torch.channels_last)
x = torch.randn(1, 3, {size}, {size}).contiguous(memory_format=torch.channels_last)
best = {{"fp32": float("inf"), "bf16": float("inf")}}
with torch.inference_mode():
    for precision in ["fp32", "bf16"] * ({repeats} + 1):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with ctx:
            start = time.perf_counter()
            model(x)
            best[precision] = min(best[precision], time.perf_counter() - start)
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(), **best}}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="square input side (pascal's is 512)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per precision (after one warm-up)")
    a = p.parse_args()
    flags = set()
    try:
        flags = {f for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features"))
                 for f in line.split(":", 1)[1].split()}
    except OSError:
        pass
    results = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"}), "size": a.size}
    for label, extra in (("native", {}), ("avx2-only", {"ONEDNN_MAX_CPU_ISA": "AVX2",
                                                        "ATEN_CPU_CAPABILITY": "avx2"})):
        out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), size=a.size, repeats=a.repeats)],
                             env=dict(os.environ, **extra), capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        r["bf16/fp32"] = round(r["bf16"] / r["fp32"], 2)
        results[label] = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
        print(f"{label:10s} ({r['capability']}): fp32 {r['fp32']:.3f} s, bf16 {r['bf16']:.3f} s, "
              f"bf16/fp32 = {r['bf16/fp32']:.2f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
