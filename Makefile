# Every target creates .venv itself when it is missing (see `setup`).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= runs/demo

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

## synth -> prepare -> short training run -> dev metrics next to the ceiling AUC
demo: $(STAMP)
	$(BIN)/mtrec demo --out $(DEMO)

test: $(STAMP)
	$(BIN)/ruff check mtrec_dist launch tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(BIN)/ruff check mtrec_dist launch tests bench
	$(BIN)/ruff format --check mtrec_dist launch tests bench

bench: $(STAMP)
	$(BIN)/python bench/bench_stream.py --out bench/results/stream.json

clean:
	rm -rf $(VENV) runs .pytest_cache
