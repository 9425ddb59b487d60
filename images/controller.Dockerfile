# syntax=docker/dockerfile:1
# The controller and merge pod: CPU only. Runs `dooly fleet submit --wait` (the nightly CronJob),
# `dooly merge` and `dooly fit`. Built from the repository root (`make images` runs this):
#   docker build -f images/controller.Dockerfile -t REGISTRY/controller:TAG .
# Only pyproject.toml, README.md, constraints.txt and dooly/ enter the build (controller.Dockerfile.dockerignore).
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm
FROM ${PYTHON_IMAGE}

# The CPU build from PyTorch's CPU index, installed first so that pip never pulls a CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/dooly

RUN groupadd --gid 10001 dooly \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/dooly --shell /usr/sbin/nologin dooly

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md constraints.txt /src/
COPY dooly /src/dooly
# The plot extra: `dooly explore` in the merge Job writes its PNG figures to the store. The runtime
# lock holds every other package to the versions the project is tested with.
RUN pip install "/src[plot]" -c /src/constraints.txt && rm -rf /src

USER 10001:10001
WORKDIR /home/dooly
ENTRYPOINT ["dooly"]
CMD ["--help"]
