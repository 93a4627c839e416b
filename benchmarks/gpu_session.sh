#!/usr/bin/env bash
# One lent-GPU session's checks in one script (the device tool's budget is minutes): the CUDA
# tests, then benchmarks/gpu.py with --variants. Run on the GPU machine from the repository root:
#     bash benchmarks/gpu_session.sh            (figures and test output also go to $OUT)
# The machine's image has torch but not the Kafka and Avro clients that importing the tests
# needs; carry their wheels (the `run` tool's carry: [".whl"]), made here with:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 -d .whl fastavro==1.13.1 confluent-kafka==2.16.1
# (versions: constraints.txt; python version: the image's python3).
set -uo pipefail
out="${OUT:-/tmp/gpu-session}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
if python3 -c "import pytest, fastavro, confluent_kafka" 2>/dev/null; then
    { timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tail -15
      timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_host_path_attack.py -k padding 2>&1 | tail -5
    } | tee "$out/tests.txt"
else
    echo "tests skipped: pytest, fastavro or confluent_kafka missing (carry .whl)" | tee "$out/tests.txt"
fi
timeout 420 python3 benchmarks/gpu.py --variants "$@" 2>&1 | tee "$out/gpu.txt"
