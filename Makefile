# deltaserve — every target does its own set-up: `make test` and `make demo` work on a fresh clone.
#
#   make test    create .venv, install pinned deps, generate gRPC stubs, lint (ruff), Debian's prometheus, run the tests
#   make lint    ruff check + ruff format --check
#   make demo    the main job on the embedded default tiny base (see README)
#   make bench-serving / bench-tuning   the benchmarks (figures, not pass/fail)
#
# On machines without a local CPU torch wheel set TORCH_INDEX, e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# and VLLM_EXTRA=gpu on a CUDA machine.

PYTHON ?= python3
VENV ?= .venv
VLLM_EXTRA ?= cpu
TORCH_INDEX ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.deltaserve-installed
PROTO_SRC := $(wildcard protos/deltaserve/v1/*.proto)
PROTO_OUT := protos/deltaserve/v1/deltaserve_pb2.py
TORCH_INDEX_ARG := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: install protos lint system-deps test demo bench-serving bench-tuning clean

install: $(STAMP) $(PROTO_OUT)

# torch first and pinned: an unpinned resolve pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "deltaserve needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet $(TORCH_INDEX_ARG) "torch==2.13.0"
	$(PY) -m pip install --quiet $(TORCH_INDEX_ARG) -e ".[$(VLLM_EXTRA),test,ray,s3]"
	$(PY) -c 'from deltaserve.plugins import compat; print("wrote", compat.install_pth())'
	$(PY) -c 'from deltaserve.plugins import compat; print(compat.check())'
	touch $(STAMP)

protos: $(PROTO_OUT)

$(PROTO_OUT): $(PROTO_SRC) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos --pyi_out=protos $(PROTO_SRC)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian's prometheus + promtool: tests/server/test_prometheus.py runs a real one against a test server.
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

test: install lint system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/deltaserve demo

bench-serving: install
	$(PY) bench/serving.py

bench-tuning: install
	$(BIN)/deltaserve bench tuning

clean:
	rm -rf $(VENV) build *.egg-info protos/deltaserve/v1/*_pb2*.py protos/deltaserve/v1/*_pb2*.pyi
