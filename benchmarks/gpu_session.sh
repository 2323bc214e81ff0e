#!/usr/bin/env bash
# The GPU checks of the data/training issue, as ONE device call (the device tool's budget is
# 15 minutes a session, start-up included: plan one call of about 10 minutes).
#
# Preparation on the development machine, once, in the repository root (.whl/ and .data/
# are git-ignored and travel with `carry`):
#   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl thop==0.1.1.post2209072238
# Then call the device tool with carry [".whl", ".data"] and the command
#   bash benchmarks/gpu_session.sh STAGES
# STAGES (default "tests throughput resnet56"): any of
#   tests       tests/test_gpu.py (CUDA loader, bf16 + channels_last training, fusion on GPU)
#   throughput  benchmarks/train_throughput.py on CIFAR-10, ResNet-110, batch 512
#   resnet56    `resprune run resnet56_cifar10` (80 + 20 epochs; ~4 min at 11k img/s eager)
#   resnet110   `resprune run resnet110_cifar10` (80 + 20 epochs; ~8 min at 11k img/s eager)
#   smoke       a 1-epoch resnet56 run, to check the plumbing in seconds
# Each stage has its own time limit; what it wrote lands in $OUT (at most 8 files come back).
# DRY=1 runs the same commands on the CPU with tiny settings (plumbing check, no GPU).
set -u
STAGES=${*:-tests throughput resnet56}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}   # read straight from the archive (decoded once, cached)
[ -e "$DATA" ] || { echo "no CIFAR-10 data at $DATA (see the preparation above)"; exit 2; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  $PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"; } \
  | tee "$OUT/env.txt"
if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu; TP="--device cpu --batch 32 --steps 1 --rounds 1 --model resnet20"
  SET="--set train.epochs=1 --set finetune.epochs=1 --set data.train_limit=512 --set data.batch_size=128"
else
  DEV=cuda; TP="--batch 512 --rounds 3"; SET=""
fi
rc=0
logged() {  # logged FILE LIMIT_S CMD...: run with a time limit, output to the terminal and FILE
  local file=$1 limit=$2; shift 2
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$file"
  local s=${PIPESTATUS[0]}
  [ "$s" = 0 ] || { echo "!! exit $s: $*"; rc=1; }
}
for stage in $STAGES; do
  echo "== $stage $(date -u +%T)"
  case $stage in
    tests) logged test_gpu.log 240 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py ;;
    throughput) logged throughput.md 300 $PY benchmarks/train_throughput.py --data-dir "$DATA" $TP ;;
    smoke|resnet56|resnet110)
      recipe=resnet56_cifar10; limit=${RUN_TIMEOUT:-560}; extra=$SET
      [ "$stage" = resnet110 ] && recipe=resnet110_cifar10
      [ "$stage" = smoke ] && { limit=300; extra="--set train.epochs=1 --set finetune.epochs=1 ${SET}"; }
      rm -rf "/tmp/run_$stage"
      logged "$stage.log" "$limit" $PY -m resprune run $recipe --data-dir "$DATA" --device $DEV --out "/tmp/run_$stage" $extra
      cp "/tmp/run_$stage/report.md" "$OUT/${stage}_report.md" 2>/dev/null || true ;;
    *) echo "unknown stage $stage (tests, throughput, smoke, resnet56, resnet110)"; rc=2 ;;
  esac
done
echo "== done $(date -u +%T) rc=$rc"
exit $rc
