#!/usr/bin/env python3
"""Where ONNX Runtime's forward pass spends its time: its own per-node profile of the runtimes' ONNX file,
each node's arithmetic from the shapes in that profile, and each group's rate against a lone 3x3
convolution (512 to 512 channels at 64 x 64, channels-last, torch's oneDNN): the rate the limits study of
benchmarks/throughput.py divides by.

    python benchmarks/onnxruntime_profile.py [--rounds 8] [--dataset pascal] [--onnx FILE] [--json out.json]

Without --onnx a synthetic checkpoint in the released format is exported to a temporary folder first.
The session is set up as `--backend onnxruntime` sets it up (schp.backends.onnxruntime_options: torch's
thread count, all graph optimisations); one warm-up pass, then `--rounds` profiled passes of one crop of
the input size, with the lone convolution timed (best of `--rate-seconds`) before, between and after them:
every pass is divided by the limit at the better of the two rates beside it, as a shared machine's speed
may drift between passes. A group's figures are the medians over the passes. FLOP = 2 x multiply-adds
of the convolutions (and of Gemm/MatMul): for a convolution 2 x N x out_h x out_w x (weight values),
which holds for ONNX Runtime's blocked (NCHWc) layout too. Run it on a quiet machine.
"""
import argparse
import collections
import json
import math
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


CONV_OPS = ("Conv", "FusedConv", "NchwcConv")
MATMUL_OPS = ("Gemm", "MatMul", "FusedMatMul")


def node_flops(op: str, inputs, outputs) -> int:
    """2 x multiply-adds of one profiled node, from its input and output shapes (0 for other ops)."""
    if not outputs or not inputs:
        return 0
    out = outputs[0]
    if op in CONV_OPS and len(inputs) >= 2 and len(out) >= 4:
        weight = inputs[1]  # Cout x Cin/groups x kh x kw (blocked layouts: the same values, regrouped)
        return 2 * out[0] * out[2] * out[3] * math.prod(weight)
    if op in MATMUL_OPS and len(inputs) >= 2:
        return 2 * math.prod(out) * inputs[0][-1]
    return 0


def shapes(arg_list):
    """[[dims], ...] from the profile's 'input_type_shape' / 'output_type_shape' entries."""
    result = []
    for entry in arg_list or []:
        for dims in entry.values():
            result.append([int(d) for d in dims])
    return result


def group_of(op: str, inputs, outputs, flops: int) -> str:
    """A row of the summary: convolutions by kernel and output resolution, other ops by type."""
    if flops and op in CONV_OPS:
        weight, out = inputs[1], outputs[0]  # kh, kw and the output's h, w at [2], [3] in blocked layouts too
        return f"conv {weight[2]}x{weight[3]} at {out[2]}x{out[3]}"
    return op


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8, help="profiled forward passes")
    p.add_argument("--dataset", default="pascal", choices=sorted(DATASETS))
    p.add_argument("--onnx", type=Path, help="a runtimes' ONNX file to profile (default: export a synthetic one)")
    p.add_argument("--top", type=int, default=12, help="slowest single nodes to list")
    p.add_argument("--rate-seconds", type=float, default=1.0, help="seconds of lone convolutions before each pass")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    import numpy as np
    import onnxruntime as ort
    import torch

    from schp.backends import export_for_runtimes, onnxruntime_options
    from schp.checkpoint import read_state_dict
    from throughput import conv_rate_512, make_checkpoint

    spec = DATASETS[a.dataset]
    h, w = spec.input_size
    with tempfile.TemporaryDirectory(prefix="schp-ort-profile-") as tmp:
        path = a.onnx
        if path is None:
            ckpt = Path(tmp) / "synthetic.pth"
            make_checkpoint(ckpt, a.dataset)
            path = Path(tmp) / "network.onnx"
            print("exporting a synthetic checkpoint ...", flush=True)
            export_for_runtimes(spec, read_state_dict(ckpt), path)
        options = onnxruntime_options()  # the runner's own, profiled
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort-profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
        feed = {session.get_inputs()[0].name: x}
        session.run(["fusion"], feed)  # warm-up (its events are dropped below)
        walls, timed = [], [conv_rate_512(torch.float32, a.rate_seconds)["best_gflops"]]
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            session.run(["fusion"], feed)
            walls.append(time.perf_counter() - t0)
            timed.append(conv_rate_512(torch.float32, a.rate_seconds)["best_gflops"])
        # each pass's limit: the better of the lone convolution's rates just before and just after it (a
        # shared machine's speed drifts; the limits study of benchmarks/throughput.py takes the better too)
        rates = [max(before, after) for before, after in zip(timed, timed[1:])]
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if len(runs) != a.rounds + 1:
        sys.exit(f"expected {a.rounds + 1} model_run events in the profile, found {len(runs)}")
    # each node's kernel time per pass: the passes are told apart by the model_run event spans
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs[1:]]
    per_node = collections.defaultdict(lambda: [0.0] * a.rounds)
    facts = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        k = next((i for i, (s, t) in enumerate(spans) if s <= e["ts"] <= t), None)
        if k is None:
            continue
        args = e.get("args", {})
        name = e["name"][:-len("_kernel_time")]
        per_node[name][k] += e["dur"] / 1e6
        if name not in facts:
            op = args.get("op_name", "?")
            ins, outs = shapes(args.get("input_type_shape")), shapes(args.get("output_type_shape"))
            flops = node_flops(op, ins, outs)
            facts[name] = {"op": op, "flops": flops, "group": group_of(op, ins, outs, flops),
                           "inputs": ins, "outputs": outs}
    gflop = sum(f["flops"] for f in facts.values()) / 1e9
    ratios = [wall * rate / gflop for wall, rate in zip(walls, rates)]  # each pass / its limit
    groups = {}
    for name, times in per_node.items():
        g = groups.setdefault(facts[name]["group"], {"nodes": 0, "flops": 0, "seconds": [0.0] * a.rounds})
        g["nodes"] += 1
        g["flops"] += facts[name]["flops"]
        g["seconds"] = [x + t for x, t in zip(g["seconds"], times)]
    for g in groups.values():  # per pass: the group's time over what it would take at that pass's rate
        g["over_seconds"] = statistics.median(t - g["flops"] / 1e9 / r for t, r in zip(g["seconds"], rates))
        g["fraction_of_rate"] = (statistics.median(g["flops"] / 1e9 / t / r for t, r in zip(g["seconds"], rates))
                                 if g["flops"] else None)
        g["seconds"] = statistics.median(g["seconds"])
    nodes = {n: {**facts[n], "seconds": statistics.median(t)} for n, t in per_node.items()}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "onnxruntime": ort.__version__, "torch_threads": torch.get_num_threads(), "dataset": a.dataset,
        "input_size": [h, w], "rounds": a.rounds, "gflop": gflop, "conv3x3_gflops_timed": timed,
        "conv3x3_gflops_per_pass": rates,
        "forward_seconds_per_pass": walls, "x_limit_per_pass": ratios, "x_limit_median": statistics.median(ratios),
        "groups": groups,
        "slowest_nodes": sorted(({"name": n, **v} for n, v in nodes.items()), key=lambda v: -v["seconds"])[:a.top],
    }
    if a.json:  # first: the figures are kept even if the printing below is cut short
        a.json.write_text(json.dumps(result, indent=1))
    print(f"{result['machine']}, onnxruntime {ort.__version__}, {torch.get_num_threads()} threads; {gflop:.1f} GFLOP "
          f"per {h} x {w} crop")
    print(f"lone 3x3 conv before, between and after the passes: {' '.join(f'{r:.0f}' for r in timed)} GFLOP/s")
    print(f"forward passes: {' '.join(f'{t:.3f}' for t in walls)} s")
    print(f"x the limit at the better rate beside each pass: {' '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}")
    print(f"\n{'group (medians of the passes)':<30} {'nodes':>5} {'s':>7} {'GFLOP':>7} {'x rate':>7} {'s over it':>10}")
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["seconds"]):
        fraction = f"{g['fraction_of_rate']:.2f}" if g["fraction_of_rate"] else "-"
        print(f"{name:<30} {g['nodes']:>5} {g['seconds']:>7.3f} {g['flops'] / 1e9:>7.2f} {fraction:>7} "
              f"{g['over_seconds']:>10.3f}")
    print(f"\nslowest {a.top} nodes (median s):")
    for v in result["slowest_nodes"]:
        gf = v["flops"] / 1e9
        print(f"  {v['seconds']:.4f} s  {v['op']:<12} {gf:6.2f} GFLOP {(gf / v['seconds'] if gf else 0):6.0f} GFLOP/s  "
              f"in {v['inputs'][:2]} out {v['outputs'][:1]}")


if __name__ == "__main__":
    main()
