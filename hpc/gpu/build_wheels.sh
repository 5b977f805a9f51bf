#!/usr/bin/env bash
# Wheels that `make gpu-check` installs on a GPU machine that has CUDA torch but no network
# (Python 3.12, manylinux x86_64). Run here, where pip reaches PyPI:
#   bash hpc/gpu/build_wheels.sh [DEST]        (default DEST: .whl, ignored by git)
# Versions are those of this venv (the ones the test suite ran with). torch, numpy, pyyaml,
# tqdm, scikit-learn, matplotlib, click, attrs, certifi, psutil, py-cpuinfo, msgpack, einops,
# ninja, nvidia-ml-py, packaging, cloudpickle, typing-extensions and torchvision (it must be the
# build matching the image's CUDA torch, so it cannot be carried from here) are expected on the
# GPU machine already (a CUDA PyTorch image); everything else satfuse imports is listed below.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p "$DEST"

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# satfuse's own needs (webdataset, braceexpand, submitit, rasterio, deepspeed) and theirs, and
# the check's test runner: pytest, pytest-timeout (the suite's hang guard) and theirs (a CUDA
# PyTorch image need not have pytest; gpu_check.sh imports both before it starts)
# timm (ViT/Swin backbones, the ViT-B/16 and Swin-T rows) and what it needs that a CUDA image
# lacks: safetensors, huggingface_hub and its own (filelock, fsspec, hf-xet, httpx2 & co)
BINARY=(webdataset braceexpand submitit rasterio affine cligj click-plugins
        hjson pydantic pydantic-core annotated-types typing-inspection
        timm safetensors huggingface_hub filelock fsspec hf-xet httpx2 httpcore2 anyio h11 idna
        truststore
        pytest pytest-timeout pluggy iniconfig pygments)
specs=()
for name in "${BINARY[@]}"; do specs+=("$name==$(version "$name")"); done

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${specs[@]}"

# DeepSpeed is an sdist on PyPI: pure Python without prebuilt ops (DS_BUILD_OPS unset), so a
# py3-none-any wheel built here runs there (ops it needs are JIT-built on first use).
if ! ls "$DEST"/deepspeed-"$(version deepspeed)"-*.whl >/dev/null 2>&1; then
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
fi

# one version of each package: two would stop the install there
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then echo "more than one wheel of: $dups (in $DEST); remove the old ones" >&2; exit 1; fi
ls -la "$DEST"
du -sh "$DEST"
