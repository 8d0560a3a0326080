#!/usr/bin/env bash
# The GPU check in one run: device and versions, `pytest -m gpu`, our trial's per-epoch time
# against `mtt train` on the same GPU, and the worker-scaling rows (workers_per_gpu 1, 2, 4).
# Each part runs under its own `timeout`, so one hang cannot eat the rest; every result lands
# in one folder (a file per part and summary.txt).
#
#   bash benchmarks/gpu_check.sh --prepare     # on the CPU machine: the wheels the GPU image
#                                              # lacks, in .whl/gpu (one carry, < 60 MiB)
#   bash benchmarks/gpu_check.sh RESULTS       # on the GPU machine, from the repo root, with
#                                              # .whl/gpu there: installs them, then checks
#   DEVICE=cpu SCALE=dry bash benchmarks/gpu_check.sh /tmp/dry   # the dry run on a CPU machine
#
# On the GPU machine the parts' limits add up to 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  # ../shared/gpu/wheels.sh splits what the GPU image lacks in two halves of ~37 MiB. One carry
  # holds them without the PostgreSQL drivers (no PostgreSQL there), MLflow's web UI, and the
  # metatensor/metatomic libraries built for torch < 2.10 (the image has torch 2.11).
  set -e
  bash ../shared/gpu/wheels.sh >/dev/null
  rm -rf .whl/gpu && mkdir -p .whl/gpu && mv .whl/a/*.whl .whl/b/*.whl .whl/gpu/ && rmdir .whl/a .whl/b
  rm -f .whl/gpu/psycopg*.whl
  python3 - .whl/gpu/mlflow-[0-9]*.whl .whl/gpu/metatensor_torch-*.whl .whl/gpu/metatomic_torch-*.whl <<'PY'
import re, sys, zipfile
unused = re.compile(r"mlflow/server/js/|metatensor_torch/torch-2\.\d/|metatomic/torch/torch-2\.\d/")
for path in sys.argv[1:]:
    with zipfile.ZipFile(path) as wheel:
        kept = {i.filename: wheel.read(i) for i in wheel.infolist() if not unused.match(i.filename)}
    record = next(name for name in kept if name.endswith(".dist-info/RECORD"))
    lines = kept[record].decode().splitlines()
    kept[record] = "".join(f"{line}\n" for line in lines if not unused.match(line)).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in kept.items():
            wheel.writestr(name, data)
PY
  du -sh .whl/gpu
  exit 0
fi

out=${1:-gpu-results}
mkdir -p "$out"
device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1 PET_LORA_SWEEPER_CACHE=${PET_LORA_SWEEPER_CACHE:-/tmp/pet-lora-cache}
if [ -d .whl/gpu ] && [ "${SCALE:-gpu}" != dry ]; then  # the dry run uses its own Python
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/gpu/*.whl \
    || { echo "install failed" | tee "$out/summary.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
python=${PYTHON:-python3}
# The parts' sizes: on the GPU, then the dry run's (only the device is new on the GPU).
if [ "${SCALE:-gpu}" = dry ]; then
  overhead=(--epochs 2 --threads 2) workers=(--workers 1,2 --trials 2 --epochs 2)
else
  overhead=(--epochs 6 --threads 4) workers=(--workers-per-gpu 1,2,4 --trials 8 --epochs 6)
fi

part() {  # part NAME SECONDS COMMAND...: its output in NAME.txt, its exit and seconds in summary.txt
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc$([ $rc = 124 ] && echo ' (timed out)'), $((SECONDS - start)) s" | tee -a "$out/summary.txt"
}

part environment 30 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $python -c 'import torch, metatrain, mlflow, optuna
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available())
print(\"metatrain\", metatrain.__version__, \"mlflow\", mlflow.__version__, \"optuna\", optuna.__version__)
print(\"gpu\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\")'"
part pytest_gpu 95 $python -m pytest -m gpu -p no:cacheprovider -q tests/test_gpu.py
part overhead_vs_mtt 95 $python benchmarks/overhead_vs_mtt.py --device "$device" "${overhead[@]}"
part worker_scaling 260 $python benchmarks/worker_scaling.py "${workers[@]}"
echo "results in $out"
