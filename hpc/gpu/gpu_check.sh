#!/usr/bin/env bash
# `make gpu-check`: the one prepared check for a GPU machine (CUDA torch installed, no network).
#   1. install the wheels carried in .whl/ (hpc/gpu/build_wheels.sh) into a target dir;
#   2. synthesise a small SEN12MS-like shard set (256x256 patches);
#   3. run `satfuse bench gpu --device cuda` on the shards (GPU_CHECK_BENCH_TIMEOUT, default 300 s);
#   4. run the tests marked `cuda` (GPU_CHECK_TESTS_TIMEOUT, default 240 s), a skip counting as a
#      failure (--fail-skips).
# The tests' 240 s (not measured on a GPU yet) covers a first run on a fresh machine: pytest's
# start and collection (31 s), the shard fixture (17 s), the eager Trainer runs (3 x 4 s), all
# measured on a loaded 2-core CPU, plus a cold `train.compile=true` (190 s of inductor's build on
# that CPU, with 16+ cores on a GPU node assumed at most a third of that), then doubled. With
# synthesis (~1 min) and the bench's 300 s the whole stays near one 10-minute call.
# It fails closed: when torch cannot use a CUDA device it stops at once with FAIL (no step would
# test the GPU: the bench would measure the CPU, every `cuda` test would skip).
# The JSON and the log go to $OUT (or ./gpu-check-out when OUT is unset). Exit status: non-zero
# when a step or a check failed. Knobs: GPU_CHECK_PATCHES (default 1600: one batch of 128 per
# worker at 12 workers), GPU_CHECK_PYTHON, GPU_CHECK_SITE, GPU_CHECK_WORK, GPU_CHECK_TESTS=0,
# GPU_CHECK_BENCH_ARGS (extra `satfuse bench gpu` arguments, e.g. "--skip reference").
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${GPU_CHECK_PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
WORK=${GPU_CHECK_WORK:-/tmp/satfuse-gpu-check}
PATCHES=${GPU_CHECK_PATCHES:-1600}
exec > >(tee "$OUT/gpu-check.log") 2>&1
status=0
step() { echo "== $(date -u +%H:%M:%S) $*"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  step "installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import satfuse, torch, torchvision, timm, webdataset, braceexpand, pytest, pytest_timeout; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" || exit 1
# fail closed: without a usable CUDA device nothing below would test the GPU
if ! "$PY" -c "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"; then
  step "FAIL: CUDA did not initialise (above: torch's error, or its CUDA build is 'None'); fix the driver or the CUDA torch, then rerun"
  exit 1
fi

SHARDS="$WORK/shards/gpucheck"
if [ ! -f "$SHARDS/manifest.json" ]; then
  scenes=$(( (PATCHES + 63) / 64 ))
  step "synthesising $((scenes * 64)) pairs at 256x256 and sharding them"
  "$PY" -m satfuse.cli synth sen12ms --out "$WORK/raw" --scenes "$scenes" --patches-per-scene 64 \
    --size 256 --overwrite || exit 1
  "$PY" -m satfuse.cli shard --src "$WORK/raw" --dataset sen12ms --out "$SHARDS" --maxcount 64 \
    --workers "$(nproc)" --overwrite || exit 1
fi

# the bench first: its JSON (gpu-check.json.partial after each section) is what matters most
step "satfuse bench gpu --device cuda"
# shellcheck disable=SC2086
timeout "${GPU_CHECK_BENCH_TIMEOUT:-300}" "$PY" -m satfuse.cli bench gpu --device cuda --shards "$SHARDS" \
  --out "$OUT/gpu-check.json" ${GPU_CHECK_BENCH_ARGS:-} || { status=1; step "FAIL: satfuse bench gpu"; }

if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
  step "tests marked cuda (a skip is a failure here)"
  timeout "${GPU_CHECK_TESTS_TIMEOUT:-240}" "$PY" -m pytest -q -rA -m cuda tests/gpu -p no:cacheprovider \
    --fail-skips --junitxml "$OUT/gpu-check-tests.xml" || { status=1; step "FAIL: tests marked cuda"; }
fi
step "done (status $status): $OUT/gpu-check.json"
exit $status
