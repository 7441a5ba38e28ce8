# The Python image: `synthflux generate`, `preprocess` and the classify driver/report.
#
#   docker build -f docker/python.Dockerfile -t synthflux-python .      (or: make images)
#
# The default base is the official PyTorch CUDA runtime image, which already holds a CUDA
# build of torch: the package and its other dependencies are installed next to it. Any
# Debian/Ubuntu image works too with INSTALL_PYTHON=1 (Python from apt, torch from TORCH);
# tests/test_containers.py builds it that way on a locally made Debian image. Nothing is
# baked in that belongs to a run: the config is mounted (/config), the data root is a volume
# (/data) and so is the Hugging Face cache (/cache), so weights are downloaded once.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# 1: the base has no usable Python (plain Debian/Ubuntu): install python3 + venv with apt.
ARG INSTALL_PYTHON=0
# A torch requirement installed before the package, e.g. "torch==2.13.0+cpu"; empty keeps
# the base image's torch (the default base's CUDA build; pip would otherwise pull another).
ARG TORCH=""
# Where pip gets packages when not from PyPI (a mirror, a wheelhouse); unset by default. As a
# build arg it reaches pip as PIP_INDEX_URL: the tests serve a local wheelhouse this way.
ARG PIP_INDEX_URL
# The non-root user; the Julia image uses the same ids, so both can write the shared volume.
ARG UID=1000
ARG GID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0:0
# Run-time settings first: with the classic builder every instruction is a container, and on a
# copy-on-write-less storage driver (vfs) each one after the big layers costs minutes.
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    PYTHONUNBUFFERED=1
WORKDIR /data
ENTRYPOINT ["synthflux"]
CMD ["--help"]

# A venv sidesteps Debian's "externally managed" system Python (PEP 668). On a base with its
# own Python it sees the base's packages (--system-site-packages), so its torch is reused.
# Fresh named volumes mounted on /data and /cache/huggingface take these folders' owner.
# hadolint ignore=DL3008
RUN if [ "$INSTALL_PYTHON" = 1 ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/* \
        && python3 -m venv /opt/venv; \
    else \
        python3 -m venv --system-site-packages /opt/venv; \
    fi \
    && groupadd --non-unique --gid "$GID" synthflux \
    && useradd --non-unique --uid "$UID" --gid "$GID" --create-home --shell /bin/bash synthflux \
    && mkdir -p /data /cache/huggingface /config \
    && chown "$UID:$GID" /data /cache /cache/huggingface

# Dependencies first, from pyproject.toml alone: this layer (the slow one) is rebuilt only
# when the requirements change, not on every source edit. (The pins are pyproject's and TORCH's;
# reading it takes Python 3.11+, which both the default base and Debian bookworm have.)
COPY python/pyproject.toml /src/python/pyproject.toml
# hadolint ignore=DL3013
RUN if [ -n "$TORCH" ]; then pip install --no-cache-dir "$TORCH"; fi \
    && python -c 'import tomllib; print("\n".join(tomllib.load(open("/src/python/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY python/ /src/python/
RUN pip install --no-cache-dir --no-deps /src/python \
    && rm -rf /src \
    && synthflux --version

USER ${UID}:${GID}
