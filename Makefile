# Every target creates the environment from nothing when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: env test demo dashboard clean

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# A real campaign on scikit-learn's digits, on an embedded SQLite file.
demo: $(STAMP)
	$(BIN)/batchlab run examples/demo_digits.toml --storage sqlite:///out/demo.db --workers 2 --figure out/demo_scaling.png

dashboard: $(STAMP)
	$(BIN)/batchlab dashboard --storage sqlite:///out/demo.db

clean:
	rm -rf $(VENV) out
