# Every target creates the environment from nothing when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: env test test-oldest demo dashboard postgres postgres-stop clean

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The trainers' tests on the oldest PyTorch pyproject.toml allows (torch>=2.4, e.g. a
# GPU machine's preinstalled one): an API renamed or added since fails here, not there.
OLDEST_VENV ?= .venv-oldest
OLDEST_TORCH ?= torch==2.4.1 torchvision==0.19.1
OLDEST_STAMP := $(OLDEST_VENV)/.installed

$(OLDEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/pip install -q $(OLDEST_TORCH) -e '.[dev]'
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pytest -q tests/trainers

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
	rm -rf $(VENV) $(OLDEST_VENV) out
