#!/usr/bin/env bash
# TF 2.9 parity without Docker (`invoke tf29-check`): a fresh Debian bullseye root (Python
# 3.9) with tensorflow-cpu 2.9.3 and the image's other packages; inside it, by chroot: the
# smoke pipeline (dvc repro: train, export with TF 2.9, validate in a fresh process), an
# explicit SavedModel load, and one billed request to the metered endpoint.
# Needs root (debootstrap, mounts, chroot) and access to Debian's and PyPI's servers. Nothing
# is cached between runs: DEST is rebuilt each time. Usage: tf29_check.sh [DEST]
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$SRC/build/tf29}"
RFS="$DEST/rootfs"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
HOST_PY="${PYTHON:-$SRC/.venv/bin/python}"
[ -x "$HOST_PY" ] || HOST_PY="$(command -v python3)"
START=$SECONDS

step() { echo ">> [$((SECONDS - START)) s] $*" >&2; }
die() { echo "error: tf29-check: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, mount, chroot); run it as root or in CI"
command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install -y debootstrap)"

unmount_all() {
  # Lazy unmounts, innermost first: a chroot process that is still exiting must not block it.
  local m
  for m in sys dev proc; do
    if mountpoint -q "$RFS/$m" 2>/dev/null; then umount -l "$RFS/$m" || true; fi
  done
}
trap unmount_all EXIT

if [ -d "$RFS" ]; then unmount_all; fi
rm -rf "$DEST"
mkdir -p "$DEST"

step "debootstrap bullseye into $RFS (~1-2 minutes)"
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates,git \
  bullseye "$RFS" "$MIRROR" >"$DEST/debootstrap.log" 2>&1 \
  || { tail -20 "$DEST/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

# pip in the root fails TLS behind this machine's proxy unless it trusts the host's CA bundle.
cp /etc/ssl/certs/ca-certificates.crt "$RFS/etc/ssl/host-ca.crt"
mount -t proc proc "$RFS/proc"
mount --bind /dev "$RFS/dev"
mount -t sysfs sysfs "$RFS/sys"

in_root() {
  chroot "$RFS" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/host-ca.crt SSL_CERT_FILE=/etc/ssl/host-ca.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=2 TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=/work/ws "$@"
}

# The image's package set (docker/requirements.in) with the CPU build of the same TF, and
# without Jupyter (not part of the check).
mkdir -p "$RFS/work"
{
  echo "tensorflow-cpu==2.9.3"
  grep -v -E '^(tensorflow==|jupyter)' "$SRC/docker/requirements.in"
} >"$RFS/work/requirements.txt"
step "python venv with tensorflow-cpu 2.9.3 and the image's packages (~2-4 minutes)"
in_root python3 -m venv /opt/venv
in_root pip install --quiet "uv==0.5.*"
in_root uv pip install --quiet --python /opt/venv/bin/python -r /work/requirements.txt

step "smoke workspace (from this checkout) at $RFS/work/ws"
"$HOST_PY" -m pipeline.workspace --profile smoke "$RFS/work/ws" >/dev/null
cp "$SRC/docker/tf29_serving_smoke.py" "$RFS/work/"

step "smoke pipeline on TF 2.9 (dvc repro)"
in_root bash -c 'cd /work/ws && dvc repro validate' >"$DEST/repro.log" 2>&1 \
  || { tail -40 "$DEST/repro.log" >&2; die "dvc repro failed on TF 2.9 (log above, full: $DEST/repro.log)"; }

step "load the SavedModel TF 2.9 exported"
in_root python - <<'PY'
import json
import numpy as np
import tensorflow as tf

model_dir = "/work/ws/models/sentiment/1"
card = json.load(open(model_dir + "/model_card.json"))
fn = tf.saved_model.load(model_dir).signatures["serving_default"]
out = fn(input_ids=tf.constant(np.full((2, 8), 5, np.int32)),
         attention_mask=tf.constant(np.ones((2, 8), np.int32)))
probs = out["probabilities"].numpy()
exported_with = card["exported_with"]["tensorflow"]
assert tf.__version__.startswith("2.9."), tf.__version__
assert exported_with.startswith("2.9."), "exported by TF %s, not 2.9" % exported_with
assert probs.shape == (2, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4), probs
print("tf29 savedmodel: TF %s loaded %s, exported by TF %s, probabilities %s"
      % (tf.__version__, model_dir, exported_with, probs.shape))
PY

step "one billed request to the metered endpoint on TF 2.9"
in_root bash -c 'cd /work/ws && python /work/tf29_serving_smoke.py models/sentiment/1 /work/ledger.sqlite3'

step "TF 2.9 parity: OK"
echo "tf29-check: OK (smoke pipeline, SavedModel load and a billed request on TensorFlow 2.9.3; $((SECONDS - START)) s)"
