# The two commands a new user runs: `make demo` and `make test`. Both create .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= data
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: demo test venv install install-dev bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/attrlab demo --out $(DATA)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m bench.shard_read --out $(DATA)/bench

clean:
	rm -rf $(DATA) .pytest_cache
