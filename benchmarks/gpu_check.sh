#!/usr/bin/env bash
# The prepared GPU check: on a machine with CUDA, from a checkout, in about 8 minutes:
#   1. the Python to run it: $PYTHON if set; else the machine's python3 as it is, when it already holds
#      a CUDA build of torch and this project's run-time and test packages (GPU images ship them, often
#      on machines that cannot reach a package registry: nothing is installed then); else a virtual
#      environment with torch 2.14.1 / torchvision 0.29.1 (CUDA build) and requirements.txt,
#      requirements-test.txt, installed from the registry (skipped with REUSE_VENV=1 when it exists);
#   2. the CUDA-only checks and the GPU throughput benchmark (benchmarks/gpu_check.py: GPU inverse warp and
#      argmax against the CPU path, fp32 / bf16 / fp16 maps, the command line on CUDA, torchrun with every
#      GPU over NCCL; images/s end to end at batch 1, 8, 32 in fp32, bf16, fp16, and the model alone);
#   3. the suite's device tests on the GPU machine (tests that look at torch.cuda.is_available()).
# Everything it measures goes to one folder: OUT (default gpu_check_results/): nvidia-smi.txt, pip.log,
# gpu_check.json, gpu_check.txt, pytest.txt, summary.txt. Exit 0 when every check passed, 1 when one failed,
# 77 when the machine has no CUDA (nothing measured), 2 when the set-up failed.
#
#   bash benchmarks/gpu_check.sh [OUT]
#   REHEARSE_ON_CPU=1 bash benchmarks/gpu_check.sh [OUT]   # every step on the CPU, small: proves the script
#                                                           # runs where no GPU is; its figures mean nothing
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-gpu_check_results}" && cd "${1:-gpu_check_results}" && pwd)"
VENV="${VENV:-$ROOT/.gpu-venv}"
PY="$VENV/bin/python"
START=$(date +%s)
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
say "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), checkout $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
else
    GPUS=0
fi
say "GPUs seen by nvidia-smi: $GPUS"

# whether Python $1 can run the check as it is: prints what it holds, exit 0 when it can
ready() {
    "$1" - <<'PY'
import os, sys
try:
    import cv2, numpy, PIL, pytest, torch, tqdm  # noqa: F401  requirements.txt and the device tests
except ImportError as err:
    sys.exit(f"missing package: {err.name}")
held = (f"Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"OpenCV {cv2.__version__}, numpy {numpy.__version__}")
if not cv2.__version__.startswith("4."):
    sys.exit(f"{held}; OpenCV is not 4.x")  # 5.x changes the warp, and with it the maps
if not torch.cuda.is_available() and os.environ.get("REHEARSE_ON_CPU") != "1":
    sys.exit(f"{held}; this torch sees no CUDA device")
print(held)
PY
}

MACHINE=$(ready python3 2>&1); MACHINE_READY=$?
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
    say "using PYTHON=$PY as it is: $(ready "$PY" 2>&1 | tr '\n' ' ')"
elif [ "$MACHINE_READY" = 0 ]; then
    PY=$(command -v python3)
    say "using the machine's $PY as it is (nothing installed): $MACHINE"
elif [ "$GPUS" = 0 ] && [ "${REHEARSE_ON_CPU:-0}" != 1 ]; then
    say "no GPU on this machine (nvidia-smi lists none, and python3: ${MACHINE:-none}): nothing installed or measured"
    exit 77
elif [ "${REUSE_VENV:-0}" = 1 ] && [ -x "$PY" ]; then
    say "reusing $VENV"
else
    say "the machine's python3 cannot run the check as it is (${MACHINE:-no python3})"
    say "installing into $VENV (pip log: $OUT/pip.log)"
    { python3 -m venv "$VENV" &&
      "$PY" -m pip install -q --upgrade pip &&
      "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 &&
      "$PY" -m pip install -q -r "$ROOT/requirements.txt" -r "$ROOT/requirements-test.txt"; } \
        > "$OUT/pip.log" 2>&1 || { say "set-up failed: see $OUT/pip.log"; exit 2; }
fi
say "set-up done after $(( $(date +%s) - START )) s"

ARGS=()
[ "$GPUS" -ge 1 ] && ARGS=(--torchrun)
[ "${REHEARSE_ON_CPU:-0}" = 1 ] && ARGS=(--rehearse-on-cpu --torchrun)
timeout 330 "$PY" "$ROOT/benchmarks/gpu_check.py" --out "$OUT" "${ARGS[@]}" 2>&1 | tee -a "$OUT/summary.txt"
CHECK=${PIPESTATUS[0]}
if [ "$CHECK" = 77 ]; then
    say "no CUDA on this machine: nothing measured"
    exit 77
fi
[ "$CHECK" = 124 ] && say "gpu_check.py stopped at its 330 s limit: $OUT/gpu_check.json holds what it measured"

# the suite's tests that take another branch with CUDA present (device choice, GPU warnings, setup)
( cd "$ROOT" && timeout 120 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_cli.py::test_device_choice_follows_the_original_gpu_option \
    tests/test_cli.py::test_cuda_device_without_cuda_is_a_setup_error \
    tests/test_setup.py::test_device_index_the_machine_lacks_is_a_setup_error_with_the_count \
    tests/test_setup.py::test_cuda_device_beyond_this_machine_is_one_line_exit_2 \
    tests/test_transforms.py::test_torch_warp_for_gpus_matches_the_opencv_warp ) > "$OUT/pytest.txt" 2>&1
TESTS=$?
say "device tests of the suite: $(tail -1 "$OUT/pytest.txt") (exit $TESTS)"
say "gpu_check finished after $(( $(date +%s) - START )) s; figures in $OUT"
[ "$CHECK" = 0 ] && [ "$TESTS" = 0 ] && exit 0
exit 1
