# Two entry points: `make run` (predict on the bundled examples) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: run test setup clean

$(BIN)/nucleiseg: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(BIN)/nucleiseg

setup: $(BIN)/nucleiseg

run: setup
	$(BIN)/nucleiseg predict src/nucleiseg/examples -o results --overwrite

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) results
