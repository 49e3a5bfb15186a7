#!/usr/bin/env bash
# GPU checks of the teacher path, in one short run: (1) the chunked top-k correctness tests in bf16 and on CUDA
# (tests/test_teacher.py, tests/test_targets.py and tests/test_compact_batches.py, `-k "bf16 or cuda or device_map"`;
# with several GPUs visible the device-map test spreads a replica over them; compact batches are decoded on CUDA),
# then (2) the capture-overhead benchmark
# (bench/capture.py) with a ~1B-parameter Llama (hidden 2048, 8 layers, V 128256, bf16) on the GPU.
# Everything is printed to stdout; the script exits non-zero as soon as a step fails. About 2-3 minutes on one
# H100 (most of it building and saving the random model); needs ~25 GB of GPU memory.
#
# Assumes: a machine with a CUDA GPU, this repository checked out, and `pip install -e .[dev]` already done in the
# active Python environment with a CUDA build of torch. Nothing is downloaded: models and tokenizers are built from
# configs and Python standard-library text.
#
# Usage (from anywhere):
#   bash bench/gpu_check.sh                        # on cuda
#   bash bench/gpu_check.sh --device cpu --quick   # the same steps on CPU in under a minute (checks the script)
# Environment: PYTHON, the interpreter to use (default: python).

set -euo pipefail

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python}"
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== environment"
"$PY" - "$DEVICE" <<'EOF'
import sys

import torch

device = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("gpu_check.sh: torch sees no CUDA device; install a CUDA build of torch, or pass --device cpu")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}")
EOF

echo
echo "== 1/2 chunked top-k correctness: pytest -k 'bf16 or cuda or device_map'"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# pipefail: a pytest failure fails the script through the pipe.
"$PY" -m pytest tests/test_teacher.py tests/test_targets.py tests/test_compact_batches.py -q -rs -p no:cacheprovider -k "bf16 or cuda or device_map" 2>&1 | tee "$log"
if [[ "$DEVICE" == cuda* ]] && grep -q "skipped" "$log"; then
  echo "gpu_check.sh: FAIL: tests were skipped on a CUDA machine, so CUDA was not exercised" >&2
  exit 1
fi

echo
echo "== 2/2 capture overhead: bench/capture.py on $DEVICE"
if [ "$QUICK" = 1 ]; then
  "$PY" bench/capture.py --quick --device "$DEVICE"
else
  # chunk_bytes: the Teacher's default by device, 1 GiB on CUDA (64 MiB chunks, 130 rows at V 128k, would leave
  # select_topk launch-bound). timing_s in the output shows what the encoder thread hid behind the forwards.
  "$PY" bench/capture.py --device "$DEVICE" --hidden 2048 --layers 8 --vocab 128256 --tokens 65536 \
    --max-length 2048 --batch-tokens 16384 --reps 3 --topk-rows 2048
fi

echo
echo "== gpu_check.sh: all steps passed"
