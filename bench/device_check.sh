#!/usr/bin/env bash
# Issue 9's GPU checks as one script for a session that is lent a device (15 minutes of
# device time in all, a machine start included, 10 minutes per command): the GPU trainer
# tests with compilation, the graphed step's write-back (bench.graphed_step), the
# large-batch step compiled or not and in the textbook layer order (bench.conv_stacking),
# the Shallue MNIST study estimate, the worker's default K, and trial throughput of the
# MNIST MLP and simple CNN.
# Each step has its own time limit, cut to what is left of the script's BUDGET seconds
# (default 560; a step with under 20 s left is skipped), and writes $OUT/<step>.txt, so a
# step that runs long costs only itself. The device's image has torch, torchvision,
# pytest, scikit-learn and PyYAML but not optuna or sqlalchemy, and no registry access:
# bring those as wheels (device-wheels.sh names every dependency they need there).
#
# Prepare, from the repository root on the development machine:
#   ../shared/tools/device-wheels.sh
#   mkdir -p .devdata/datasets && cp -r ../shared/datasets/mnist-t10k .devdata/datasets/
#   grep -qx '/.devdata/' .git/info/exclude || echo '/.devdata/' >> .git/info/exclude
#   .venv/bin/python -m bench.fetch_mnist .devdata/datasets/mnist   # full MNIST, for MODE=probe
# Run with the device tool:  command "bash bench/device_check.sh", carry [".whl", ".devdata"],
# timeout_s 600 (BUDGET 560 leaves the last step's kill margin). Read the results from the
# files it brings back. ONLY="graphed_step throughput" runs just the steps named.
# MODE=probe runs, instead of the checks, the data for the Shallue study's verdict: two
# probes of the study on the full MNIST (its first 8 nesterov trials per cell, cut at
# 10,000 steps for B = 16..512 and 1,500 for B = 1024..16384), whose steps-to-result feed
# the estimate; the trials come back in $OUT/probe.db.
# A dry run of the wiring here, on the CPU with small sizes:
#   DEVICE=cpu SMALL=1 bash bench/device_check.sh;  DEVICE=cpu SMALL=1 MODE=probe bash bench/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/batchlab-device-check}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export BATCHLAB_SHARED=$PWD/.devdata  # tests/shared_data.py: datasets/mnist-t10k under it
DATA=.devdata/datasets/mnist-t10k

DEADLINE=${BUDGET:-560}  # seconds from the script's start (bash's SECONDS)

step() {  # step NAME SECONDS COMMAND...: run it under a limit, keep its output, show its tail
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ "$left" -lt 20 ]; then echo "== $name skipped: ${left}s left"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, at ${SECONDS}s)"
  # SIGINT first: pytest then still prints its failures, a bench its traceback.
  timeout -s INT -k 10 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "rc=$?" >>"$OUT/$name.txt"
  tail -n 30 "$OUT/$name.txt"
}

if [ -n "${SMALL:-}" ]; then  # the dry run: every command, tiny
  TP=(--batch-sizes 16 --ks 4 --steps 5 --repeats 1 --sequential-trials 1)
  WORKER_TRIALS=2
  TP_512=("${TP[@]}")
  TP_LARGE=("${TP[@]}")
  SE=(--batch-sizes 16,32,64 --measure-batch-sizes 16,64 --trials 2 --train-size 512 --val-size 256)
  TESTS=(tests/trainers/test_cuda_graphs.py)
  GS=(--k 2 --steps 2 --repeats 1)
  CS=(--cells 64:1 --compile-cells 64:1 --iters 2 --repeats 1)
else
  TP=(--batch-sizes 16,128 --ks 8,32 --steps 200 --repeats 2 --sequential-trials 2)
  TP_512=(--batch-sizes 512 --ks 8 --steps 100 --repeats 1 --sequential-trials 1)
  TP_LARGE=(--batch-sizes 1024 --ks 8,32 --steps 100 --repeats 1 --sequential-trials 2)
  SE=(--measure-batch-sizes 16,256,4096,16384 --profile)
  GS=(--k 32 --batch-size 16 --steps 50 --repeats 3)
  CS=(--cells 4096:1,16384:1 --compile-cells 4096:1,16384:1 --iters 10 --repeats 2)
  TESTS=(tests/trainers/test_cuda_graphs.py tests/trainers/test_vectorized.py
         tests/trainers/test_vectorized_conv.py tests/trainers/test_vectorized_bn.py
         tests/trainers/test_loop.py::test_build_model_draws_on_its_device_from_the_seed_alone)
fi

FULL=.devdata/datasets/mnist  # bench.fetch_mnist's copy of the full MNIST
PROBE=(--device "$DEVICE" --steps 20 --repeats 1 --data-dir "$FULL" --run --run-optimizers nesterov
       --run-trials 8 --run-storage "sqlite:///$OUT/probe.db")
if [ -n "${SMALL:-}" ]; then
  PROBE_SMALL=(--batch-sizes 256,512 --measure-batch-sizes 256 --run-batch-sizes 256 --run-trials 1
               --run-max-steps 20 --k 1)
  PROBE_LARGE=(--batch-sizes 256,512 --measure-batch-sizes 512 --run-batch-sizes 512 --run-trials 1
               --run-max-steps 20 --k 1)
  SMALL_NAME=shallue2018_mnist_simple_cnn_b256-256_t1_s20
else
  PROBE_SMALL=(--measure-batch-sizes 16,512 --run-batch-sizes 16,32,64,128,256,512 --run-max-steps 10000)
  PROBE_LARGE=(--measure-batch-sizes 16,256,4096,16384 --run-batch-sizes 1024,2048,4096,8192,16384
               --run-max-steps 1500)
  SMALL_NAME=shallue2018_mnist_simple_cnn_b16-512_t8_s10000
fi

step env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c '
import torch, torchvision, optuna, sqlalchemy
print(torch.__version__, torchvision.__version__, optuna.__version__, sqlalchemy.__version__)
print(torch.cuda.is_available() and torch.cuda.get_device_name())'"
if [ "${MODE:-checks}" = probe ]; then
  rm -f "$OUT/probe.db"
  step probe_small 240 $PY -m bench.shallue_estimate "${PROBE[@]}" "${PROBE_SMALL[@]}"
  # The second estimate has every batch size's S: the first probe's from its database.
  step probe_large 300 $PY -m bench.shallue_estimate "${PROBE[@]}" "${PROBE_LARGE[@]}" \
    --from-storage "sqlite:///$OUT/probe.db" --campaign-name "$SMALL_NAME"
  ls -l "$OUT"
  exit 0
fi
# Correctness first: a fast number from a broken compiled path means nothing. No -x: one
# call should report every failure.
step gpu_tests 130 env BATCHLAB_COMPILE_TESTS=1 $PY -m pytest -q -rfE -p no:cacheprovider "${TESTS[@]}"
# The compiled step CUDA graphs replay, its write-back copied after it or compiled into it.
step graphed_step 90 $PY -m bench.graphed_step --device "$DEVICE" "${GS[@]}"
# The large-batch step, a study's most expensive cells (one trial at a time there, eager):
# what torch.compile of the plain model's step would gain, never measured yet, and what
# pooling before the bias and ReLU (a0d2c50, 0eb186a) saved against the textbook order.
step conv_compiled 120 $PY -m bench.conv_stacking --device "$DEVICE" "${CS[@]}"
step shallue_estimate 90 $PY -m bench.shallue_estimate --device "$DEVICE" --steps 20 --repeats 1 \
  --data-dir /nonexistent "${SE[@]}"
# The worker's default on CUDA (--trials-at-once auto): the K it picks per cell (its log's
# first lines) and a few groups trained through SQLite end to end.
step worker_auto 90 bash -c "rm -f /tmp/bl-auto.db && $PY -m study.cli campaign create examples/demo_digits.toml \
  --storage sqlite:////tmp/bl-auto.db && $PY -m study.cli worker --campaign demo_digits \
  --storage sqlite:////tmp/bl-auto.db --device $DEVICE --max-trials ${WORKER_TRIALS:-24} \
  && $PY -m study.cli status --campaign demo_digits --storage sqlite:////tmp/bl-auto.db; \
  $PY -m study.cli worker --campaign demo_digits --storage sqlite:////tmp/bl-auto.db --device cuda:99; \
  echo \"a device it lacks: exit \$? (2 expected)\""
step throughput 260 $PY -m bench.trial_throughput --device "$DEVICE" --data-dir "$DATA" \
  --workloads mnist10k_mlp,mnist10k_simple_cnn --no-vmap-rows "${TP[@]}"
# The largest batch CUDA graphs replay (_GRAPH_MAX_BATCH), with and without them.
step throughput_512 80 $PY -m bench.trial_throughput --device "$DEVICE" --data-dir "$DATA" \
  --workloads mnist10k_mlp,mnist10k_simple_cnn --no-vmap-rows "${TP_512[@]}"
# Last: the table also has B = 1024 (beyond the B <= 128 target), if time is left.
step throughput_1024 110 $PY -m bench.trial_throughput --device "$DEVICE" --data-dir "$DATA" \
  --workloads mnist10k_mlp,mnist10k_simple_cnn --no-vmap-rows "${TP_LARGE[@]}"
ls -l "$OUT"
