#!/usr/bin/env bash
# Issue 9's GPU checks as one script for a session that is lent a device (15 minutes of
# device time in all, a machine start included, 10 minutes per command): the GPU tests,
# trial throughput of the MNIST MLP and simple CNN on CUDA, and the Shallue MNIST study
# estimate. Each step has its own time limit and writes $OUT/<step>.txt, so a step that
# runs long costs only itself. The device has torch and torchvision but not optuna,
# sqlalchemy, pytest or scikit-learn (the digits tests), and no registry access: bring
# them as wheels (--no-deps: every dependency is named).
#
# Prepare, from the repository root on the development machine:
#   ../shared/tools/device-wheels.sh pytest pluggy iniconfig packaging pygments tqdm PyYAML \
#     scikit-learn joblib threadpoolctl
#   mkdir -p .devdata/datasets && cp -r ../shared/datasets/mnist-t10k .devdata/datasets/
#   grep -qx '/.devdata/' .git/info/exclude || echo '/.devdata/' >> .git/info/exclude
# Run with the device tool:  command "bash bench/device_check.sh", carry [".whl", ".devdata"],
# timeout_s 560. Read the results from the files it brings back.
set -uo pipefail
OUT=${OUT:-/tmp/batchlab-device-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export BATCHLAB_SHARED=$PWD/.devdata  # tests/shared_data.py: datasets/mnist-t10k under it
DATA=.devdata/datasets/mnist-t10k

step() {  # step NAME SECONDS COMMAND...: run it under a limit, keep its output, show its tail
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "rc=$?" >>"$OUT/$name.txt"
  tail -n 30 "$OUT/$name.txt"
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "
import torch, torchvision, optuna, sqlalchemy
print(torch.__version__, torchvision.__version__, optuna.__version__, sqlalchemy.__version__)
print(torch.cuda.get_device_name(), torch.cuda.is_available())"'
step gpu_tests 150 env BATCHLAB_COMPILE_TESTS=1 python3 -m pytest -q -x -p no:cacheprovider \
  tests/trainers/test_vectorized.py tests/trainers/test_vectorized_bn.py tests/trainers/test_stacked.py
step throughput 200 python3 -m bench.trial_throughput --device cuda --data-dir "$DATA" \
  --workloads mnist10k_mlp,mnist10k_simple_cnn --batch-sizes 16,128,1024 --ks 8,32 --steps 300 \
  --repeats 2 --no-vmap-rows
step shallue_estimate 150 python3 -m bench.shallue_estimate --device cuda --steps 20 \
  --batch-sizes 16,256,4096,16384 --repeats 1
ls -l "$OUT"
