# Enter the project's environment: builds or refreshes .venv from requirements.lock
# (scripts/venv.sh), then puts it first on PATH and sets the offline defaults below.
#   source scripts/env.sh        # in your shell: invoke, dvc, python -m serving ... work
# Safe to source from an interactive shell: it sets no shell options, changes no directory,
# and a failure returns an error status instead of closing your shell. Sourced by
# scripts/repro and scripts/test too.
_tm_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if bash "$_tm_root/scripts/venv.sh"; then
  export PATH="$_tm_root/.venv/bin:$PATH"
  # Offline by design: nothing in the default pipeline talks to a hub; say so to the
  # libraries so a missing network fails fast instead of waiting on time-outs. A user with
  # hub access who names a pretrained model in params.yaml sets TOKENMETER_ONLINE=1.
  if [ "${TOKENMETER_ONLINE:-0}" != "1" ]; then
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  fi
  export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" TOKENIZERS_PARALLELISM=false
  unset _tm_root
else
  unset _tm_root
  false
fi
