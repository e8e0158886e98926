# ldm_train — `make demo` runs the whole pipeline on the embedded shapes data; `make test` runs the tests.
# Both create .venv on first use (one pip call, torch/torchvision pinned by requirements/constraints.txt).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ldm_train-installed
DEMO_ARGS ?=
ABLATION_EXPERIMENT ?= ablation
ABLATION_F ?= 4,8,16
ABLATION_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-all lint bench ablation clean

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-8s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv and install ldm_train with its dev tools (once; quick afterwards)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: setup ## Quickstart on 2 CPU cores: stage 1 → calibrate → stage 2 → samples, caption alignment, evaluate (~7–8 min on an older 2-core CPU)
	$(PY) -m ldm_train stage=pipeline experiment=quickstart $(DEMO_ARGS)

test: setup ## Run the test suite (CPU, tiny models; one pytest-xdist worker per core, a test file per worker)
	$(PY) -m pytest -n auto --dist loadfile -m "not slow" tests

test-all: setup ## The test suite with the slow end-to-end runs too (a few minutes more)
	$(PY) -m pytest -n auto --dist loadfile tests

lint: setup ## ruff
	$(VENV)/bin/ruff check .

bench: setup ## Stage-1 benchmark (KL f=4 32 px ≤3 min, KL f=8 64 px ≤10 min): PSNR, LPIPS variant, step time
	$(PY) scripts/bench_autoencoder.py

ablation: setup ## The f ablation on shapes (quickstart size, ~8 min per f on 2 cores): multirun/…/ablation.md + plots
	@start=$$(date +%s); \
	$(PY) -m ldm_train -m stage=pipeline experiment=$(ABLATION_EXPERIMENT) f=$(ABLATION_F) $(ABLATION_ARGS) && \
	echo "ablation wall time: $$(( $$(date +%s) - start )) s"

clean: ## Remove outputs (keeps .venv and artifacts/)
	rm -rf outputs multirun wandb lightning_logs
