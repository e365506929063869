#!/usr/bin/env bash
# The check run on a lent GPU machine (see README, "Performance"): the CUDA tests, the GPU
# scoreboard, then the whole suite under that machine's torch. Wheels for what the machine lacks
# (optree, torchbayesian) are carried in .whl/. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
timeout 240 python3 -m benchmarks --device cuda --no-compile --repeats 9 --out "$OUT/gpu" 2>&1 | tail -3
timeout 150 python3 -m pytest -q -p no:cacheprovider tests -x --deselect tests/test_benchmarks.py 2>&1 | tail -12 | tee "$OUT/full_suite.log"
