# syntax=docker/dockerfile:1
# The `official` base of the tokenmeter image: tensorflow/tensorflow:2.9.3-gpu-jupyter (Ubuntu
# 20.04, Python 3.8, CUDA 11.2, cuDNN 8.1) pinned by tag AND digest, plus what the project
# layer needs from Ubuntu. TF_DIGEST has no default on purpose: `invoke build --base official`
# passes the one in docker/base-image.digest (`invoke pin-base` records it where Docker Hub is
# reachable), so an unpinned build fails instead of silently floating.
ARG TF_TAG=2.9.3-gpu-jupyter
ARG TF_DIGEST
FROM docker.io/tensorflow/tensorflow:${TF_TAG}@${TF_DIGEST}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# NVIDIA rotated its CUDA apt signing key in 2022; images of this era still list the CUDA
# and machine-learning repositories with the old key, so `apt-get update` fails on them.
# CUDA and cuDNN already come from the base image and nothing here needs those repositories,
# so their source lists are dropped rather than re-keyed (no new trust root to pin).
# Versions: the focal series of each package (a prefix pin keeps security fixes).
RUN rm -f /etc/apt/sources.list.d/cuda.list /etc/apt/sources.list.d/cuda*.list \
          /etc/apt/sources.list.d/nvidia-ml.list \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
         "openssh-server=1:8.2p1-4ubuntu0.*" \
         "tini=0.18.0-1" \
         "git=1:2.25.1-1ubuntu3.*" \
    && rm -rf /var/lib/apt/lists/* \
    # No host keys in the image: the entrypoint generates them at first start, in a volume.
    && rm -f /etc/ssh/ssh_host_* \
    && mkdir -p /etc/tokenmeter \
    && echo official >/etc/tokenmeter/base

# A base is a build stage for docker/Dockerfile, which switches to root to install and ends as
# uid 1000. Should anyone run a base on its own, it runs as nobody, not as root.
USER 65534:65534
