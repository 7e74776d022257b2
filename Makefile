# Every target installs what it needs into ./.venv (pinned by constraints.txt) on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip -c constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check crawler tests benchmarks
	$(BIN)/mypy --strict crawler

# Two workers (pytest-xdist), each given whole files: a file's tests never run beside each other.
test: lint
	$(BIN)/pytest -n 2 --dist loadfile

# The inner loop: the in-process tests only (no test marked `slow`: those start processes or soak).
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m crawler.cli.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache demo-out
