# The two set-up commands of the README: `make run` (main job) and `make test` (whole suite).
# Both create .venv on first use. TORCH_SPEC pins the CPU wheel that lies on the dev machines'
# disk; on a GPU machine pip takes the CUDA build of the same release from PyPI. Override it to
# keep a torch you already have, e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
RUN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test lint docs clean setup

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: $(VENV)/.ready
	$(BIN)/flowtext run $(RUN_ARGS)

test: $(VENV)/.ready
	$(BIN)/ruff check flowtext tests experiments benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy flowtext
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q

docs: $(VENV)/.ready
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis
