# Every target creates .venv itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_REPO ?= models
DEFAULT_MODEL ?= digits-mlp

.PHONY: install run train test lint bench fixtures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: serve the model repository, publishing the default digits model first if it has none.
run: install
	@if ! ls -d $(MODEL_REPO)/$(DEFAULT_MODEL)/[0-9]* >/dev/null 2>&1; then \
		$(PY) -m training train --arch mlp --dataset digits --repo $(MODEL_REPO) --name $(DEFAULT_MODEL); \
	fi
	BNN_MODEL_REPO=$(MODEL_REPO) $(PY) -m service

# Train and publish a new version of the default model.
train: install
	$(PY) -m training train --arch mlp --dataset digits --repo $(MODEL_REPO) --name $(DEFAULT_MODEL)

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .numba_cache
