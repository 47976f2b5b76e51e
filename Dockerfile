# syntax=docker/dockerfile:1
# One image for every alphamath service; the Kubernetes manifests pick the service by its
# arguments (`python -m policy_svc|value_svc|search_svc|sandbox_svc|trainer_svc`, or
# `python -m trainer_svc.train|trainer_svc.promote` for the jobs). TGI runs from its own image.
#
#   docker build -t alphamath:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=<a CPU-only wheel index> -t alphamath:0.1.0-cpu .
#
# torch comes from the default index unless TORCH_INDEX_URL is given: on x86_64 that is the
# CUDA build, so the same image serves value_svc/training on GPU nodes and everything on CPU.
ARG BASE_IMAGE=debian:12.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-venv python3-dev gcc \
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
RUN pip install . && python -c "import alphamath, policy_svc, value_svc, search_svc, sandbox_svc, trainer_svc"

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# python3 + numpy/sympy: the interpreter the sandbox runs model-written code with (the
# services themselves use the venv). tini reaps the sandbox's child processes and forwards
# SIGTERM so in-flight requests drain on a rollout. bubblewrap: the sandbox's inner jail.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends \
      python3 python3-numpy python3-sympy tini bubblewrap ca-certificates \
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
    ALPHAMATH_CACHE=/tmp/alphamath
# Pods run with a read-only root filesystem; /tmp (and /checkpoints) are volumes.
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 50052 50053 50054 50055 8080 9101 9102 9103 9104 9105
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["alphamath", "--help"]
