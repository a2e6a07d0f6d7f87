# Every target creates .venv itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_REPO ?= models
DEFAULT_MODEL ?= digits-mlp
FASHION_MODEL ?= fashion-reactnet

.PHONY: install run train test test-fast lint bench default-model fashion-model grpc-stubs docker-wheels docker-build docker-test clean

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
	$(PY) -m service --model-repository $(MODEL_REPO)

# Train and publish a new version of the default model.
train: install
	$(PY) -m training train --arch mlp --dataset digits --repo $(MODEL_REPO) --name $(DEFAULT_MODEL)

test: install
	$(PY) -m pytest -q

# The fast lane: unit tests only, no servers, Docker, browser, training or kernel compilation.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not docker and not kernels"

# Style, formatting, and types of model/ (mypy reads its settings from pyproject.toml).
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: install
	$(PY) -m bench

# Regenerate the gRPC stubs (committed) from the vendored proto; grpcio-tools is a dev dependency.
GRPC_PROTO := service/protocol/grpc/grpc_service.proto
grpc-stubs: install
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(GRPC_PROTO)

# Regenerate the small default model shipped in the serving image (deploy/models, kept in git;
# the shipped one predates the digits recipes keeping their last epoch, docs/training.md).
default-model: install
	rm -rf deploy/models/$(DEFAULT_MODEL)
	$(PY) -m training train --arch mlp --dataset digits --seed 0 --repo deploy/models --name $(DEFAULT_MODEL) --no-progress

# Regenerate the Fashion-MNIST residual model served next to it (ReActNet, the `fast` recipe;
# needs Debian's dataset-fashion-mnist package and a C++ compiler; on 2 cores about 16 minutes
# where the CPU has AVX-512 BF16 (bf16 autocast), 30 without).
fashion-model: install
	rm -rf deploy/models/$(FASHION_MODEL)
	$(PY) -m training train --arch reactnet --dataset fashion --recipe fast --seed 0 --repo deploy/models --name $(FASHION_MODEL) --no-progress

# Put torch's CPU wheel where the trainer image looks first (from the local wheel cache or the
# PyTorch CPU index), so that the image never pulls the multi-GB CUDA build.
docker-wheels: install
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --dest deploy/wheels \
		--extra-index-url https://download.pytorch.org/whl/cpu 'torch==2.13.0'

docker-build: docker-wheels
	docker compose --profile train build

# The end-to-end deployment test alone (it is also part of `make test` where Docker runs).
docker-test: docker-wheels
	$(PY) -m pytest -q -s tests/test_deployment.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis .numba_cache
