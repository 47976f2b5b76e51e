# syntax=docker/dockerfile:1
# One image for every alphamath service; the Kubernetes manifests pick the service by its
# arguments (`python -m policy_svc|value_svc|search_svc|sandbox_svc|trainer_svc`, or
# `python -m trainer_svc.train|trainer_svc.promote` for the jobs). TGI runs from its own image.
#
#   docker build -t alphamath:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=<a CPU-only wheel index> -t alphamath:0.1.0-cpu .
#   docker build --target sandbox -t alphamath-sandbox:0.1.0 .   # optional: sandbox_svc without torch
#
# The sandbox service imports no torch (tests/test_sandbox_svc.py checks it), so the optional
# `sandbox` target holds only its gRPC/metrics dependencies: model-written code then runs next to
# ~100 MB of Python instead of ~5 GB. It is a second target of this one Dockerfile, not a second
# build to maintain; the manifests use the one image unless you point `alphamath-sandbox` at it
# (k8s/README.md).
#
# torch comes from the default index unless TORCH_INDEX_URL is given: on x86_64 that is the
# CUDA build, so the same image serves value_svc/training on GPU nodes and everything on CPU.
ARG BASE_IMAGE=debian:12.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-venv python3-dev gcc g++ \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/alphamath
ENV PATH=/opt/alphamath/bin:$PATH
# The heaviest dependency in its own layer, so code changes do not download it again.
RUN pip install --upgrade pip \
 && if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0; \
    else pip install torch==2.13.0; fi
WORKDIR /src
COPY pyproject.toml ./
COPY alphamath ./alphamath
COPY proto ./proto
COPY policy_svc ./policy_svc
COPY value_svc ./value_svc
COPY search_svc ./search_svc
COPY sandbox_svc ./sandbox_svc
COPY trainer_svc ./trainer_svc
COPY app ./app
RUN pip install . && python -c "import alphamath, app, policy_svc, value_svc, search_svc, sandbox_svc, trainer_svc"
# The decode kernels, compiled here (pods have no compiler and a read-only root filesystem): decode.cpp's (bf16) run
# on CPUs with AVX512-BF16 (alphamath/model/decode.py), avx2.cpp's (fp32) on CPUs with AVX2, FMA and F16C (avx2.py).
RUN python -m alphamath.model /opt/alphamath/kernels

# The sandbox service's own dependencies only (no torch): the optional slim `sandbox` target.
FROM ${BASE_IMAGE} AS build-sandbox
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/alphamath
ENV PATH=/opt/alphamath/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
COPY alphamath ./alphamath
COPY proto ./proto
COPY policy_svc ./policy_svc
COPY value_svc ./value_svc
COPY search_svc ./search_svc
COPY sandbox_svc ./sandbox_svc
COPY trainer_svc ./trainer_svc
RUN pip install --upgrade pip \
 && pip install grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 \
      prometheus-client==0.26.0 \
 && pip install --no-deps . \
 && python -c "import sys, sandbox_svc.server, alphamath.sandbox.executor; assert 'torch' not in sys.modules"

# Runs as the pod's uid 10001 with the pod backend: python3 + numpy/sympy is the interpreter the
# model's code runs with (apt's, under /usr); gVisor (RuntimeClass gvisor) is the kernel boundary.
# No tini: the service is pid 1 and reaps its own children (k8s/base/sandbox.yaml).
FROM ${BASE_IMAGE} AS sandbox
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-numpy python3-sympy \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 alphamath \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin alphamath
COPY --from=build-sandbox /opt/alphamath /opt/alphamath
ENV PATH=/opt/alphamath/bin:$PATH PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /
EXPOSE 50054 9104
CMD ["python", "-I", "-m", "sandbox_svc"]

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# python3 + numpy/sympy: the interpreter the sandbox runs model-written code with (the
# services themselves use the venv). tini reaps child processes and forwards SIGTERM so
# in-flight requests drain on a rollout (the sandbox pod runs without it: see its manifest).
# No bubblewrap or runsc: inside the gVisor pod the sandbox uses its `pod` backend.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends \
      python3 python3-numpy python3-sympy tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 alphamath \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin alphamath
COPY --from=build /opt/alphamath /opt/alphamath
COPY --chmod=0755 k8s/image/alphamath-checkpoint-gate /usr/local/bin/alphamath-checkpoint-gate
ENV PATH=/opt/alphamath/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    ALPHAMATH_CACHE=/tmp/alphamath \
    ALPHAMATH_KERNEL_DIR=/opt/alphamath/kernels
# Pods run with a read-only root filesystem; /tmp (and /checkpoints) are volumes.
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 50052 50053 50054 50055 8080 9101 9102 9103 9104 9105
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["alphamath", "--help"]
