# Two commands matter: `make demo` and `make test`. Each creates .venv on a fresh machine first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A machine with GPUs installs its CUDA torch into .venv first (see README); otherwise the CPU build is used.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-unit test-faults test-heavy gpu-check bench docs clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@# pip 23's resolver backtracks into a false conflict on this dependency set; 25+ resolves it.
	@$(PIP) install -q 'pip>=25,<26.2'
	@# torch first and pinned: any looser request would make pip fetch a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	@# DeepSpeed ships as an sdist whose setup imports torch: build it against the torch above,
	@# never in an isolated build env (which would download another torch).
	@$(BIN)/python -c "import deepspeed" 2>/dev/null || $(PIP) install -q --no-build-isolation "deepspeed>=0.16"
	$(PIP) install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mqscale.train

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the fast part: no Ray, no subprocess, no DeepSpeed process group, no long computation
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not slow and not heavy"

# the fault-injection suite alone, its heavy variants included (more kills, ZeRO-3, CPU-Adam offload)
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q tests/fault -m "heavy or not heavy"

# every test marked heavy, across the suite
test-heavy: $(STAMP)
	$(BIN)/python -m pytest -q -m heavy

# on one H100/H200: the gpu-marked tests, MFU of 307m/1.4b, 307m sampling; one JSON (about 8 minutes)
gpu-check: $(STAMP)
	bench/gpu_check.sh runs/gpu_check.json

# every benchmark script prints one JSON object
bench: $(STAMP)
	@for b in sampling train_step train data mqvae tokenize_stage sample faults; do $(BIN)/python bench/$$b.py || exit 1; done

clean-venv:
	rm -rf $(VENV)

docs: $(STAMP)
	$(BIN)/python -m mqscale.docs
