# satfuse: the two commands of the README live here.
#   make demo   set up, then run the whole story on synthetic data (data -> shards ->
#               2-process pretraining -> fine-tuning vs baselines -> table + plot)
#   make test   set up, then run the test suite (starts a local SLURM cluster for the slurm tests)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.satfuse-installed

.PHONY: setup demo test lint clean gpu-check

setup: $(STAMP)

# torch==2.14.1 + torchvision==0.29.1 first: the pair on this disk (a CUDA build that runs on the
# CPU; torchvision from PyPI does not import beside the 2.13.0 CPU file, and timm needs it). The
# project's ranges are one minor release wide (torch 2.14.x, torchvision 0.29.x: what ran), so a
# cluster's own CUDA 2.14 build satisfies them; pinning here keeps pip from pulling another build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q setuptools wheel
	# DeepSpeed's sdist is pure Python: build it against the torch above, not in an isolated
	# build env that could pull a CUDA torch; no ops are prebuilt (DS_BUILD_OPS unset)
	$(PY) -m pip install -q --no-build-isolation deepspeed
	$(PY) -m pip install -q -e '.[dev,deepspeed,timm]'
	DS_ACCELERATOR=cpu $(PY) -m satfuse.engines.warmup || true
	touch $(STAMP)

demo: setup
	$(VENV)/bin/satfuse demo

test: setup
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests

# On a GPU machine with CUDA torch and no network (wheels from hpc/gpu/build_wheels.sh in .whl/):
# cuda-marked tests + `satfuse bench gpu`; JSON and log to $$OUT (or ./gpu-check-out).
gpu-check:
	bash hpc/gpu/gpu_check.sh

clean:
	rm -rf $(VENV) runs data reports satfuse-demo build dist gpu-check-out
