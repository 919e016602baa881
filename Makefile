# Two commands for a new user: `make run` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The shared CIFAR-10 copy on the project machines; elsewhere data/ (downloaded on first use).
DATA_ROOT ?= $(shell test -d ../shared/data/cifar10-jpeg && echo ../shared/data/cifar10-jpeg || echo data/cifar10)
EXPERIMENT ?= quickstart
# Extra Hydra overrides for make run, e.g. ARGS="trainer.max_epochs=1 data.train_subset=512" (a smoke run).
ARGS ?=

.PHONY: setup run test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: a bare "torch" would pull the newest CUDA build (gigabytes).
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/python run.py experiment=$(EXPERIMENT) data.root=$(DATA_ROOT) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) logs .pytest_cache
