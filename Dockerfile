# The faceserve image that k8s/ runs (KubeRay head, workers, the RayJob).
# The package is installed by scripts/install.sh, the recipe scripts/setup.sh
# runs in CI; the model weights are copied from a folder of the build context
# and checked against configs/weights.yaml during the build, so the image
# needs no network at start. How to build, push and load it: docs/DEPLOY.md.
#
#   docker build -t faceserve:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg WEIGHTS_DIR=weights .

# Python 3.11 (pyproject: >=3.11,<3.12) on Debian 12, patch release pinned;
# pin a digest too by passing BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:...
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- build stage
FROM ${BASE_IMAGE} AS build
# PyTorch's CPU wheels (same versions as the pins, no CUDA libraries: the Ray
# worker groups are CPU nodes). Pass an empty value for PyPI's default build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /opt/faceserve/app
# torch first, in a layer of its own: it is most of the image and changes
# only with its pin, so code changes do not download it again.
COPY scripts/install.sh scripts/install.sh
RUN bash scripts/install.sh --venv /opt/faceserve/venv --torch-only
# The package runs from this tree (editable install, as in setup.sh): it
# reads configs/ and serve_config.yaml next to its modules.
COPY pyproject.toml serve_config.yaml ./
COPY configs/ configs/
COPY index/ index/
COPY models/ models/
COPY serve_app/ serve_app/
RUN bash scripts/install.sh --venv /opt/faceserve/venv \
    && /opt/faceserve/venv/bin/python -m compileall -q /opt/faceserve/app

# ---------------------------------------------------------------- final stage
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION
ARG REVISION=unknown
# A folder of the build context with the weights files (../shared/models on
# the build machines; copy it into the context, see docs/DEPLOY.md). The
# .dockerignore lets weights/ in; another folder needs a line there.
ARG WEIGHTS_DIR=weights
LABEL org.opencontainers.image.title="faceserve" \
      org.opencontainers.image.description="Face recognition service on Ray Serve: detect, liveness, enrol, verify, identify" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# Numeric user (uid 1000, like the Ray project's images) so Kubernetes can
# enforce runAsNonRoot; it owns only its home (Ray writes under /tmp/ray).
# KubeRay starts Ray with `bash -lc`, and Debian's /etc/profile resets PATH
# for login shells: profile.d puts the virtualenv back in front.
RUN groupadd --gid 1000 faceserve \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash faceserve \
    && echo "export PATH=/opt/faceserve/venv/bin:\${PATH}" > /etc/profile.d/faceserve.sh

COPY --from=build /opt/faceserve /opt/faceserve
COPY ${WEIGHTS_DIR}/ /opt/faceserve/weights/
ENV PATH=/opt/faceserve/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/faceserve/venv \
    FACE_MODELS_DIR=/opt/faceserve/weights \
    FACE_WEIGHTS_CACHE=/home/faceserve/.cache/faceserve/weights \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/faceserve

# The build fails unless every required weights file is in the image with
# its pinned sha256 (FaceNet's are optional, fetched on first use), unless
# a login shell finds Ray (as KubeRay runs it), and unless VERSION is the
# version of the package installed.
RUN faceserve models verify \
    && bash -lc "ray --version" \
    && installed="$(python -c 'import importlib.metadata as m; print(m.version("faceserve"))')" \
    && if [ "${installed}" != "${VERSION}" ]; then \
         echo "pass --build-arg VERSION=${installed} (got '${VERSION}')" >&2; exit 1; \
       fi
