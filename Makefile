# Entry points: `make demo`, `make test` and `make lint`. Each creates .venv and installs detkit into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHAPES := data/shapes

.PHONY: venv test test-fast lint demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=15 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# ruff (pyflakes, pycodestyle, isort, bugbear) on the repository, mypy on the package; both
# configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy detkit

DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/python tools/demo.py --data $(SHAPES) --work-dir work_dirs/demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) work_dirs demo_out .pytest_cache
