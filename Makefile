# Two commands do all the set-up on a fresh machine that has python3:
#   make train   create .venv, install, train the default model on the bundled MNIST
#   make test    create .venv, install, run the test suite (make test-all: the extended scenarios too)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv train test test-all test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,test,serve,ui]'
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(BIN)/python jobs/train.py $(ARGS)

# Which tests a target runs (pytest -m). `make test`, what CI runs, leaves the extended
# scenarios (node loss, a month of nights, a worker killed mid-training, training across two
# nodes, a search end to end, the training benchmarks: ~30 min more here) to `make test-all`.
MARKS ?= not extended

# pytest exits 5 when it collected no tests: for us that is a failure, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -m "$(MARKS)" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Everything, the extended scenarios included.
test-all: $(STAMP)
	$(MAKE) test MARKS=""

# The edit loop: everything but the tests that start Ray Train workers or a Ray head.
test-fast: $(STAMP)
	$(MAKE) test MARKS="not slow and not extended"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
