# Two commands set up everything on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU-only machines,
# while on a GPU machine the same pin resolves to the CUDA build of that version.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[onnx,examples,fp8,report,slim,hf,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lightning-accel fit --config examples/digits/accelerate.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick --output benchmarks/quick

clean:
	rm -rf $(VENV) lightning_logs artifacts .pytest_cache .ruff_cache *.egg-info
