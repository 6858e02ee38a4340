#!/usr/bin/env bash
# Entrypoint of the tokenmeter image (tini is PID 1 and runs this). Modes:
#   dev          sshd (key-only) + Jupyter; stops both when either stops
#   repro [ARGS] dvc repro in the workspace ($TOKENMETER_PROFILE, e.g. smoke, applies a params
#                profile to the image's own copy); its output is also kept in logs/
#   serve [ARGS] the metered endpoint (python3 -m serving serve) on 0.0.0.0, ledger in ledger/
#   check        the image check with a GPU required (docker/check_image.py --gpu)
#   worker       one worker of multi-worker training (python3 -m pipeline.train in the
#                workspace) with the cluster and this task in $TF_CONFIG; refuses without it
#   anything else is run as given (bash, python3 -m pytest, ...)
# Every path is an overridable variable so that tests run the modes outside a container.
set -euo pipefail

CONFIG_DIR="${TOKENMETER_CONFIG_DIR:-/etc/tokenmeter}"
SSH_DIR="${TOKENMETER_SSH_DIR:-/var/lib/tokenmeter/ssh}"
RUN_DIR="${TOKENMETER_RUN_DIR:-/tmp/tokenmeter}"
WORKSPACE="${TOKENMETER_WORKSPACE:-/workspace}"
KEYS_FILE="${SSH_AUTHORIZED_KEYS_FILE:-/run/secrets/authorized_keys}"
MIN_TOKEN_CHARS=16
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export TOKENMETER_WORKSPACE="$WORKSPACE"
# The ledger volume, unless a PostgreSQL DSN or another path is given.
export TOKENMETER_LEDGER="${TOKENMETER_LEDGER:-$WORKSPACE/ledger/ledger.sqlite3}"

die() { echo "error: $*" >&2; exit 2; }
log() { echo "entrypoint: $*" >&2; }

write_mode() {
  # healthcheck.py reads it to know what to probe.
  mkdir -p "$RUN_DIR"
  echo "$1" >"$RUN_DIR/mode"
}

ensure_host_key() {
  local key="$SSH_DIR/ssh_host_ed25519_key"
  [ -d "$SSH_DIR" ] && [ -w "$SSH_DIR" ] || die "$SSH_DIR is missing or not writable; mount the ssh-host-keys volume there"
  if [ ! -s "$key" ]; then
    # Never baked into the image: each container volume gets its own key, kept across restarts.
    log "first start: generating the SSH host key in $SSH_DIR"
    rm -f "$key" "$key.pub"
    ssh-keygen -q -t ed25519 -N "" -C "tokenmeter-host" -f "$key"
  fi
  chmod 600 "$key"
  log "SSH host key: $(ssh-keygen -l -f "$key.pub")"
}

install_authorized_keys() {
  local keys="" source="" line n=0
  if [ -n "${SSH_AUTHORIZED_KEYS:-}" ]; then
    keys="$SSH_AUTHORIZED_KEYS"; source="\$SSH_AUTHORIZED_KEYS"
  elif [ -r "$KEYS_FILE" ]; then
    keys="$(cat "$KEYS_FILE")"; source="$KEYS_FILE"
  fi
  [ -n "${keys//[[:space:]]/}" ] || die "no public key for SSH: mount yours at $KEYS_FILE or set SSH_AUTHORIZED_KEYS (TOKENMETER_SSH=0 starts Jupyter only)"
  # Check each key before sshd sees it: a typo would otherwise only show as "Permission denied".
  while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    case "$line" in *PRIVATE\ KEY*) die "$source holds a private key; give the PUBLIC key (the .pub file)" ;; esac
    ssh-keygen -l -f /dev/stdin <<<"$line" >/dev/null 2>&1 || die "$source: line is not an SSH public key: ${line:0:40}..."
    n=$((n + 1))
  done <<<"$keys"
  install -d -m 700 "$HOME/.ssh"
  printf '%s\n' "$keys" >"$HOME/.ssh/authorized_keys.tmp"
  chmod 600 "$HOME/.ssh/authorized_keys.tmp"
  mv "$HOME/.ssh/authorized_keys.tmp" "$HOME/.ssh/authorized_keys"
  log "installed $n authorized key(s) from $source"
}

check_jupyter_token() {
  # Also enforced by jupyter_server_config.py; checked here first so that sshd is not started
  # for a container that is about to fail.
  local token="${JUPYTER_TOKEN:-}"
  token="${token//[[:space:]]/}"
  [ "${#token}" -ge "$MIN_TOKEN_CHARS" ] || die "JUPYTER_TOKEN is empty or shorter than $MIN_TOKEN_CHARS characters; set one, e.g. JUPYTER_TOKEN=\$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
}

run_dev() {
  check_jupyter_token
  write_mode dev
  local pids=() sshd_bin status=0
  if [ "${TOKENMETER_SSH:-1}" != "0" ]; then
    sshd_bin="$(command -v sshd)" || die "sshd is not installed"
    ensure_host_key
    install_authorized_keys
    # sshd re-executes itself, so it needs its absolute path; -D: foreground, -e: log to stderr.
    "$sshd_bin" -D -e -f "$CONFIG_DIR/sshd_config" &
    pids+=("$!")
  fi
  jupyter lab --config="$CONFIG_DIR/jupyter_server_config.py" &
  pids+=("$!")
  local stopping=0
  trap 'stopping=1; kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
  # Whichever stops first (or a signal) stops the other: a half-working dev container
  # should restart, not linger.
  wait -n || status=$?  # bash 5.0 (Ubuntu 20.04): no pid list after -n; only our jobs run
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  # Asked to stop (docker stop, Ctrl-C): a clean exit, not the signal's 143.
  [ "$stopping" = 1 ] && status=0
  log "dev stopped (status $status)"
  exit "$status"
}

run_serve() {
  python3 -m serving serve --host "${TOKENMETER_HOST:-0.0.0.0}" "$@" &
  local child=$! status=0 stopping=0
  trap 'stopping=1; kill -TERM "$child" 2>/dev/null || true' TERM INT
  wait "$child" || status=$?
  # The trap ends the first wait at once; the second waits for the drain to finish.
  if [ "$stopping" = 1 ]; then status=0; wait "$child" || status=$?; fi
  # uvicorn drains in-flight requests, then re-raises SIGTERM to die by it (143). Asked to
  # stop, that is a clean exit: docker stop / Kubernetes see 0, not a crash.
  if [ "$stopping" = 1 ] && [ "$status" = 143 ]; then status=0; fi
  log "serve stopped (status $status)"
  exit "$status"
}

mode="${1:-dev}"
[ "$#" -gt 0 ] && shift
case "$mode" in
  dev)
    run_dev
    ;;
  repro)
    write_mode repro
    cd "$WORKSPACE"
    if [ -n "${TOKENMETER_PROFILE:-}" ]; then
      # A mounted checkout is the user's own params.yaml: never rewrite it.
      [ -e .git ] && die "TOKENMETER_PROFILE rewrites params.yaml, and $WORKSPACE is a mounted checkout; run the profile there with \`invoke smoke\` instead"
      python3 -m pipeline.workspace --profile "$TOKENMETER_PROFILE" --in-place . >/dev/null
      log "params.yaml: profile $TOKENMETER_PROFILE applied"
    fi
    mkdir -p logs
    repro_log="logs/repro-$(date -u +%Y%m%dT%H%M%SZ).log"
    log "dvc repro $*; output also in $repro_log"
    dvc repro "$@" 2>&1 | tee "$repro_log"
    ;;
  serve)
    write_mode serve
    cd "$WORKSPACE"
    run_serve "$@"
    ;;
  check)
    exec python3 "$CONFIG_DIR/check_image.py" --gpu "$@"
    ;;
  worker)
    # Every worker gets the same cluster and its own task; the chief writes the outputs. The
    # stages before train (prepare, tokenizer) must have run: `repro tokenizer` first.
    tf_config="${TF_CONFIG:-}"
    [ -n "${tf_config//[[:space:]]/}" ] || die "TF_CONFIG is unset or empty; a worker needs the cluster and its own task, e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:12345\", \"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}' (index 1 on the second worker)"
    [ "$#" -eq 0 ] || die "worker takes no arguments (got: $*); the cluster and the task are in TF_CONFIG, the params in params.yaml"
    write_mode worker
    cd "$WORKSPACE"
    log "training worker; TF_CONFIG: $tf_config"
    exec python3 -m pipeline.train
    ;;
  *)
    exec "$mode" "$@"
    ;;
esac
