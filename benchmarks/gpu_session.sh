#!/usr/bin/env bash
# The GPU checks, one step per call on a lent GPU machine (each call at most 10 minutes).
#
# Prepare once on the development machine (the wheels the GPU image lacks; ~44 MB, ignored by
# git and carried with `carry: [".wheels"]`):
#   pip download --no-deps -d .wheels bitsandbytes==0.50.2 gguf tomli-w pexpect ptyprocess
# Then run, on the GPU machine, from the repository root:
#   bash benchmarks/gpu_session.sh tests      # the CUDA tests (tests/test_gpu.py), ~1 min
#   bash benchmarks/gpu_session.sh offload    # issue 3: streaming from RAM vs accelerate
#   bash benchmarks/gpu_session.sh disk       # issue 3: streaming from disk (the staging ring)
# Results (text and JSON) go to $OUT (the device tool's folder), else ./gpu-out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index .wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=$PWD
python3 - <<'EOF' | tee "$OUT/machine.txt"
import torch, transformers
print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))
EOF
case "${1:-tests}" in
    tests)
        python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt" ;;
    offload)
        python3 benchmarks/offload_bench.py --shape llama-2-70b --layers 8 --out "$OUT" 2>&1 \
            | tee "$OUT/offload_bench.txt" ;;
    disk)
        python3 benchmarks/offload_bench.py --shape llama-2-70b --layers 4 --sizes 1 \
            --skip-accelerate --disk /tmp/specexec-disk --out "$OUT" 2>&1 | tee "$OUT/disk_bench.txt" ;;
    *)
        echo "usage: $0 tests|offload|disk" >&2; exit 2 ;;
esac
