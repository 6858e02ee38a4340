"""Every file the image build reads or writes, in one place."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = ROOT / "docker"
LAYER_DOCKERFILE = DOCKER_DIR / "Dockerfile"
BASE_DIR = DOCKER_DIR / "base"
LOCKS_DIR = DOCKER_DIR / "locks"
LAYER_INPUTS = DOCKER_DIR / "requirements.in"
OFFICIAL_DIGEST = DOCKER_DIR / "base-image.digest"
# Build logs and the scratch root filesystem (git-ignored).
WORK_DIR = ROOT / "build" / "image"
# The host's CA bundle, handed to pip inside the build as a secret (never baked in): behind
# a TLS-inspecting proxy pip fails without it; elsewhere it is simply the system bundle.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
