# The two commands of the contract: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test
export PYTHONUNBUFFERED := 1

.PHONY: demo test install install-test clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(TSTAMP): requirements-test.txt $(STAMP)
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

install: $(STAMP)
install-test: $(TSTAMP)

## Train the tiny VLM on the synthetic abnormality data set (CPU, minutes) and print its metrics.
demo: $(STAMP)
	$(BIN)/python -m unveil.train $(ARGS)

## Run the test suite.
test: $(TSTAMP)
	$(BIN)/python -m pytest $(ARGS)

bench: $(TSTAMP)
	$(BIN)/python experiments/bench_rl.py
	$(BIN)/python experiments/bench_dpo.py

clean:
	rm -rf logs .cache data/synthetic
