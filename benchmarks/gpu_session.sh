#!/usr/bin/env bash
# The GPU checks, one step per call on a lent GPU machine (each call at most 10 minutes).
#
# Prepare once on the development machine (every pure wheel the project needs beside torch,
# transformers, accelerate and safetensors, which the GPU image has; ~45 MB, ignored by git and
# carried with `carry: [".wheels"]`; each is installed there only when its package is missing):
#   pip download --no-deps -d .wheels bitsandbytes==0.50.2 gguf platformdirs tomli-w pexpect \
#       ptyprocess typer rich shellingham psutil markdown-it-py mdurl pygments click
# Then run, on the GPU machine, from the repository root:
#   bash benchmarks/gpu_session.sh tests      # the CUDA tests (tests/test_gpu.py), ~1 min
#   bash benchmarks/gpu_session.sh offload    # issue 3: streaming from RAM vs accelerate
#   bash benchmarks/gpu_session.sh disk       # issue 3: streaming from disk (the staging ring)
#   bash benchmarks/gpu_session.sh gguf       # issue 17: Q4_K_M dequant against the PCIe copy
# Results (text and JSON) go to $OUT (the device tool's folder), else ./gpu-out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
for wheel in .wheels/*.whl; do
    [ -e "$wheel" ] || continue
    dist=$(basename "$wheel" | cut -d- -f1)
    python3 -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null \
        || python3 -m pip install -q --no-deps --no-index "$wheel" 2>&1 | tail -2
done
# What the tests import must be there now: name what is not, in one line.
python3 - <<'EOF'
import importlib.util
need = ["platformdirs", "gguf", "bitsandbytes", "tomli_w", "typer", "rich", "psutil", "pexpect",
        "accelerate", "safetensors", "transformers"]
missing = [n for n in need if importlib.util.find_spec(n) is None]
print("missing on this machine:", ", ".join(missing) if missing else "nothing")
EOF
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
    gguf)
        python3 benchmarks/gguf_bench.py --layers 2 --device cuda --dir /tmp/gguf-bench \
            --out "$OUT/gguf_bench.json" 2>&1 | tee "$OUT/gguf_bench.txt" ;;
    *)
        echo "usage: $0 tests|offload|disk|gguf" >&2; exit 2 ;;
esac
