# Two commands on a fresh machine: `make demo` and `make test`. Each sets everything up first.
# `make test` is the fast suite (minutes); `make test-all` adds the long broker / chaos / end-to-end
# tests (pytest marker `slow`), as CI does.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo

.PHONY: install demo demo-offline test test-all lint bench clean

# One torch thread per process unless the caller says otherwise: tests and the demo run several
# processes at once, and OpenMP threads spinning against each other on 2 cores cost far more than
# they give (a char-LSTM replay measured 6x slower with 2 threads on a busy 2-core machine).
export OMP_NUM_THREADS ?= 1

# constraints.txt pins torch to the CPU wheel that lies on disk here (no multi-GB CUDA download).
$(STAMP): pyproject.toml constraints.txt setup.py pipeline/compiledbuild.py pipeline/scorewire.py pipeline/tokenwire.py pipeline/serde.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Streaming demo: embedded broker, every stage as its own process, generated auth log with
# planted red-team events, scores archived per window, summary with the top events and AUC.
demo: install
	$(BIN)/pipeline demo --config config.yaml --workdir $(DEMO)

# The same job offline, without Kafka: generate -> replay -> eval -> top.
demo-offline: install
	mkdir -p $(DEMO)
	$(BIN)/pipeline generate --output $(DEMO)/auth.csv --labels $(DEMO)/labels.csv
	$(BIN)/pipeline replay --config config.yaml --input $(DEMO)/auth.csv --output $(DEMO)/scores.csv.gz
	$(BIN)/pipeline eval --scores $(DEMO)/scores.csv.gz --labels $(DEMO)/labels.csv
	$(BIN)/pipeline top --scores $(DEMO)/scores.csv.gz --input $(DEMO)/auth.csv -n 10

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/replay.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache build pipeline/_scorewire_c*.so
