# Two commands do all the set-up on a fresh machine that has python3:
#   make train   create .venv, install, train the default model on the bundled MNIST
#   make test    create .venv, install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv train test test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,test,serve,ui]'
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(BIN)/python jobs/train.py $(ARGS)

# pytest exits 5 when it collected no tests: for us that is a failure, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The edit loop: everything but the tests that start Ray Train workers or a Ray head.
test-fast: $(STAMP)
	$(MAKE) test PYTEST_ARGS="-m 'not slow' $(PYTEST_ARGS)"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
