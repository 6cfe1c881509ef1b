# Every target creates the environment from nothing when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: env test demo dashboard postgres postgres-stop clean

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
	mkdir -p out
	$(BIN)/batchlab run examples/demo_digits.toml --storage sqlite:///out/demo.db --workers 2 --figure out/demo_scaling.png

dashboard: $(STAMP)
	$(BIN)/batchlab dashboard --storage sqlite:///out/demo.db

# A throwaway local PostgreSQL (127.0.0.1, trust auth, fsync off); prints its URL:
#   export BATCHLAB_STORAGE=$$(make -s postgres)
PGDIR ?= /tmp/batchlab-postgres
postgres: $(STAMP)
	@$(BIN)/python -m db.local_postgres start --dir $(PGDIR)

postgres-stop: $(STAMP)
	$(BIN)/python -m db.local_postgres stop --dir $(PGDIR) --remove

clean:
	rm -rf $(VENV) out
