# make demo   Fashion-MNIST -> JPEG shards -> AlexNet (small) -> test top-1, from a fresh clone
# make test   the whole test suite (creates .venv and installs first)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build the tests run on here (a CPU build). On a GPU machine keep your CUDA torch:
#   make install TORCH=torch
TORCH ?= torch==2.13.0
SHARDS ?= data/fashion-mnist-wds
# Test processes side by side (pytest-xdist): most tests wait on processes they start, so two
# workers fill two cores; the SLURM tests share one worker (tests/conftest.py).
TEST_WORKERS ?= 2
export DATA

.PHONY: install demo test test-fast lint format clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt "$(TORCH)" -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	BIN=$(BIN) SHARDS=$(SHARDS) bash launch/demo.sh

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=40

test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not slurm" --durations=5

lint: install
	$(BIN)/ruff check alexnet_dist tests launch
	$(BIN)/ruff format --check alexnet_dist tests launch

format: install
	$(BIN)/ruff format alexnet_dist tests launch
	$(BIN)/ruff check --fix alexnet_dist tests launch

clean:
	rm -rf runs outputs .pytest_cache $(SHARDS)
