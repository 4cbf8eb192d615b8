#!/usr/bin/env python3
"""Start-up cost of building the network from a checkpoint: the previous recipe against folded_ce2p.

Each measurement is a fresh interpreter (as every command starts), in alternating order: import torch
and the engine, read the checkpoint, then build the folded network. The previous recipe built on the
meta device and called `to_empty`, whose meta-tensor path imports sympy; `schp.networks.folded_ce2p`
loads copies of the weights with `assign=True` instead. Both must give bit-identical outputs (checked
here on one 160 x 160 crop). Prints per round, medians, their ratio and the machine; --out writes JSON.
usage: python benchmarks/network_build.py [--rounds 5] [--dataset pascal] [--out build.json]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from schp.data.catalog import DATASETS  # noqa: E402  (no torch: --help stays fast)

PROBE = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import torch
from schp.checkpoint import read_state_dict
from schp.networks import build_ce2p, fold_abn, folded_ce2p
state = read_state_dict({checkpoint!r})
t1 = time.perf_counter()
if {method!r} == "to_empty":  # the previous recipe
    with torch.device("meta"):
        model = build_ce2p({classes})
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    model = fold_abn(model).eval()
else:
    model = folded_ce2p({classes}, state)
t2 = time.perf_counter()
x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    torch.save(model(x).fusion, {logits!r})
print(json.dumps({{"imports_and_read": t1 - t0, "build": t2 - t1, "sympy_imported": "sympy" in sys.modules}}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dataset", default="pascal", choices=["pascal", "lip", "atr"])  # the synthetic maker's
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "data"))
    from synth_checkpoint import save_checkpoint, synthetic_checkpoint  # the released container format

    import torch

    classes = DATASETS[a.dataset].num_classes
    with tempfile.TemporaryDirectory(prefix="schp-build-") as folder:
        checkpoint = Path(folder) / "synth.pth"
        save_checkpoint(synthetic_checkpoint(a.dataset, 0), checkpoint, legacy=False)
        rounds = []
        for r in range(a.rounds):
            row = {}
            for method in (("to_empty", "folded_ce2p") if r % 2 == 0 else ("folded_ce2p", "to_empty")):
                logits = Path(folder) / f"{method}.pt"
                code = PROBE.format(root=str(ROOT), checkpoint=str(checkpoint), method=method, classes=classes,
                                    logits=str(logits))
                done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                row[method] = json.loads(done.stdout.strip().splitlines()[-1])
            row["bit_identical"] = bool(torch.equal(torch.load(Path(folder) / "to_empty.pt"),
                                                    torch.load(Path(folder) / "folded_ce2p.pt")))
            rounds.append(row)
            print(f"round {r + 1}: build to_empty {row['to_empty']['build']:.3f} s (sympy "
                  f"{row['to_empty']['sympy_imported']}), folded_ce2p {row['folded_ce2p']['build']:.3f} s (sympy "
                  f"{row['folded_ce2p']['sympy_imported']}), outputs bit-identical {row['bit_identical']}", flush=True)
    medians = {m: statistics.median(r[m]["build"] for r in rounds) for m in ("to_empty", "folded_ce2p")}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"torch {torch.__version__}",
              "dataset": a.dataset, "rounds": rounds, "median_build_seconds": medians,
              "ratio_folded_ce2p_to_to_empty": medians["folded_ce2p"] / medians["to_empty"],
              "all_bit_identical": all(r["bit_identical"] for r in rounds)}
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    print(f"median build: to_empty {medians['to_empty']:.3f} s, folded_ce2p {medians['folded_ce2p']:.3f} s, "
          f"ratio {result['ratio_folded_ce2p_to_to_empty']:.2f}; {result['machine']}")
    return 0 if result["all_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
