#!/usr/bin/env bash
# The GPU check, in one run (e.g. on a lent GPU machine, from the repository root): the CUDA tests, then the
# CUDA benchmark; everything lands under $OUT (default ./cuda-check). Needs torch with CUDA, triton, pytest
# and hypothesis only (kernels and the benchmarks import neither pydantic nor the advisor).
#     OUT=/tmp/gpu bash benchmarks/cuda_check.sh
set -u
OUT=${OUT:-cuda-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" > "$OUT/versions.txt" 2>&1
start=$(date +%s)
timeout 270 python -m pytest -m cuda -q -s -p no:cacheprovider -o addopts="" tests/test_cuda.py > "$OUT/cuda-tests.txt" 2>&1
echo "pytest exit $? after $(( $(date +%s) - start )) s" >> "$OUT/cuda-tests.txt"
tail -3 "$OUT/cuda-tests.txt"
start=$(date +%s)
timeout 300 python -m benchmarks --device cuda --skip-pytest --rounds 15 --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "benchmark exit $? after $(( $(date +%s) - start )) s" >> "$OUT/bench.log"
tail -40 "$OUT/bench.log"
