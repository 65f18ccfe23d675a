# ELV node plugin image: `elv serve`, with the tools it runs (losetup, blkid,
# mkfs/grow/check for ext4 and xfs, fsfreeze, lvm). Debian 12, as on the CI
# machine; package versions are pinned to bookworm's. Build it with
#   docker build -t elv:0.1.0 .
# The DaemonSet in deploy/ sets only args; it runs the container privileged.
# It holds every optional dependency the DaemonSet and its overlays use:
# metrics (prometheus-client), udev (pyudev, for the lvm backend's
# --lvm-devices) and k8s (the kubernetes client, for --kubernetes-api).
#
# BASE is the image both stages start from: a Debian 12 image with Python 3.11
# and pip. scripts/build-image builds without a registry by passing a local
# stand-in made with mmdebstrap (--build-arg BASE=...).
ARG BASE=python:3.11-slim-bookworm

# ---- build: a wheel of the package and of its runtime dependencies
FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY csi ./csi
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[metrics,udev,k8s]"

# ---- runtime
FROM ${BASE}
LABEL org.opencontainers.image.title="elv" \
      org.opencontainers.image.description="ELV: Elastic Local Volumes, a CSI driver for node-local storage" \
      org.opencontainers.image.licenses="Apache-2.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        lvm2=2.03.16-2 \
        e2fsprogs=1.47.0-2+b2 \
        xfsprogs=6.1.0-1 \
        util-linux=2.38.1-5+deb12u3 \
        mount=2.38.1-5+deb12u3 \
    && rm -rf /var/lib/apt/lists/*
# LVM in the container: no warnings about descriptors inherited from the
# gRPC server (device classes set udev = "off": the host owns udev).
ENV LC_ALL=C.UTF-8 \
    LVM_SUPPRESS_FD_WARNINGS=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "elv[metrics,udev,k8s]==0.1.0" \
    && rm -rf /wheels \
    && elv --version
# The CSI socket's directory (a hostPath in the DaemonSet).
VOLUME ["/csi"]
ENTRYPOINT ["elv", "serve"]
CMD ["--endpoint=unix:///csi/csi.sock"]
