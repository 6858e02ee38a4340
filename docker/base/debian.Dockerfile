# syntax=docker/dockerfile:1
# The `debian` base of the tokenmeter image, made only from registries we reach: a Debian
# bullseye root filesystem (debootstrap, every package version pinned in
# debian-packages.lock; `python -m image` imports it as ROOTFS) plus a venv with TensorFlow
# 2.9.3 and Jupyter from debian-<VARIANT>.lock (hashes required). VARIANT=gpu adds NVIDIA's
# CUDA 11 / cuDNN 8 runtime wheels; VARIANT=cpu has tensorflow-cpu (tests, CI).
# Build it with `invoke build --base debian [--gpu]`, which builds the project layer on top.
ARG ROOTFS
FROM ${ROOTFS}

ARG VARIANT=cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The wheels' CUDA libraries live in the venv; TF 2.9 finds them by soname through
# LD_LIBRARY_PATH (absent folders in the CPU variant are harmless). NVIDIA_* tell the NVIDIA
# container toolkit to mount the host driver, as nvidia/cuda images do.
ENV LANG=C.UTF-8 \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.9/site-packages/nvidia/cuda_runtime/lib:/opt/venv/lib/python3.9/site-packages/nvidia/cublas/lib:/opt/venv/lib/python3.9/site-packages/nvidia/cufft/lib:/opt/venv/lib/python3.9/site-packages/nvidia/curand/lib:/opt/venv/lib/python3.9/site-packages/nvidia/cusolver/lib:/opt/venv/lib/python3.9/site-packages/nvidia/cusparse/lib:/opt/venv/lib/python3.9/site-packages/nvidia/cudnn/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

COPY docker/base/debian-${VARIANT}.lock /tmp/base.lock
# The CA secret is the build host's bundle (for a TLS-inspecting proxy); it is mounted for
# this step only and never lands in a layer.
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python3 -m venv /opt/venv \
    && python3 -m pip install --no-cache-dir --disable-pip-version-check --require-hashes \
         --no-deps -r /tmp/base.lock \
    && rm /tmp/base.lock \
    && mkdir -p /etc/tokenmeter \
    && echo "debian-${VARIANT}" >/etc/tokenmeter/base

# A base is a build stage for docker/Dockerfile, which switches to root to install and ends as
# uid 1000. Should anyone run a base on its own, it runs as nobody, not as root.
USER 65534:65534
