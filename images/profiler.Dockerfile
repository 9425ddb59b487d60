# syntax=docker/dockerfile:1
# The profiling pod: CUDA runtime, a torch built for it, transformers 5.17.0 (pinned by the package)
# and dooly. Built from the repository root (`make images` runs this):
#   docker build -f images/profiler.Dockerfile -t REGISTRY/profiler:TAG .
#   docker build -f images/profiler.Dockerfile --build-arg EXTRAS=vllm -t REGISTRY/profiler:TAG-vllm .
# Only pyproject.toml, README.md, constraints.txt and dooly/ enter the build (profiler.Dockerfile.dockerignore).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# 2.13: torch 2.11's fake tensors pin request dims while tracing (the tracer refuses to run on it);
# with 2.11 a pod must be handed trace files made elsewhere (`dooly trace --out`).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TRANSFORMERS_VERSION=5.17.0
# Optional extras of the package, e.g. "vllm": the CUDA vLLM 0.32.0 the vLLM adapter is validated
# with (`dooly profile --engine vllm`); it brings the torch build it was compiled against (2.13).
ARG EXTRAS=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/dooly \
    PATH=/opt/dooly/bin:$PATH \
    HOME=/home/dooly

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/dooly \
    && groupadd --gid 10001 dooly \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/dooly --shell /usr/sbin/nologin dooly

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md constraints.txt /src/
COPY dooly /src/dooly
# The runtime lock holds every other package to the versions the project is tested with (torch is
# this image's own: installed above, not in the lock).
RUN pip install "transformers==${TRANSFORMERS_VERSION}" "/src${EXTRAS:+[${EXTRAS}]}" -c /src/constraints.txt \
    && rm -rf /src

USER 10001:10001
WORKDIR /home/dooly
ENTRYPOINT ["dooly"]
CMD ["--help"]
