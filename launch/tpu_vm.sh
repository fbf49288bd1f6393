#!/usr/bin/env bash
# TPU VMs and pod slices with `gcloud compute tpus tpu-vm`: create, set up, run, follow, delete.
#
#   launch/tpu_vm.sh create NAME ACCELERATOR [--spot]   e.g. v4-8, v5litepod-256, v5p-128
#   launch/tpu_vm.sh setup  NAME        copy this checkout to every worker; venv + install (idempotent)
#   launch/tpu_vm.sh run    NAME -- --config=experiments/pretrain.py:7b --workdir=gcs/runs/7b \
#                               --config.data.source=shards:gcs/shards --config.data.tokenizer=gcs/tokenizer.model \
#                               --config.grad_accum_steps=8 [...]   (v5p-128: see the preset's docstring)
#   launch/tpu_vm.sh logs   NAME [WORKER]   follow a worker's log (default worker 0)
#   launch/tpu_vm.sh stop   NAME        stop the run on every worker (SIGTERM: the current step is saved; run resumes)
#   launch/tpu_vm.sh delete NAME
#   launch/tpu_vm.sh dry    ...         any of the above, printing the gcloud commands instead
#
# Environment: ZONE (required, e.g. us-central2-b for v4, us-west4-a for v5e, us-east5-a for
# v5p), PROJECT (default: gcloud's), RUNTIME (TPU software version; default by accelerator:
# v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e).
#
# `setup` builds a Python >= 3.11 venv on each worker (the images' python3 is 3.10: a newer
# one the image has, else uv's). `run` starts `python -m llama_jax.main` on --worker=all in
# the background (nohup, appending to logs/run.log; refused while a run is going) with
# LLAMA_JAX_DISTRIBUTED=auto, so each worker joins one jax.distributed job (JAX finds the
# slice's topology itself). Every worker must see the same workdir (each writes its own
# checkpoint shards; the lead writes metrics): with BUCKET=my-bucket, `setup` mounts
# gs://my-bucket at gcs/ in the checkout on every worker with gcsfuse (runs start in the
# checkout), so use --workdir=gcs/runs/NAME and data/tokenizer paths under gcs/.
# Rerunning `run` resumes from the last checkpoint.
set -euo pipefail

DRY=""
if [[ "${1:-}" == "dry" ]]; then DRY=show; shift; fi
show() { printf '%q ' "$@"; echo; }  # dry: each command as a line to paste, quoted
CMD="${1:-}"; NAME="${2:-}"
if [[ -z "$CMD" || "$CMD" == "help" || -z "$NAME" ]]; then  # the usage: this file's comment block
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  [[ "$CMD" == "help" ]] && exit 0 || exit 2
fi
shift 2 || true
: "${ZONE:?set ZONE, e.g. ZONE=us-central2-b}"
GC=(gcloud compute tpus tpu-vm)
FLAGS=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && FLAGS+=(--project="$PROJECT")
REMOTE='~/llama_jax'

ssh_all() { $DRY "${GC[@]}" ssh "$NAME" "${FLAGS[@]}" --worker=all --command="$1"; }

runtime_for() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "unknown accelerator $1 (v4-*, v5litepod-*, v5p-*, v6e-*); set RUNTIME to its TPU software version" >&2
       return 2 ;;
  esac
}

case "$CMD" in
  create)
    ACC="${1:?accelerator type, e.g. v4-8}"; shift
    VERSION="${RUNTIME:-}"
    [[ -n "$VERSION" ]] || VERSION="$(runtime_for "$ACC")" || exit 2  # before gcloud, not after
    $DRY "${GC[@]}" create "$NAME" "${FLAGS[@]}" --accelerator-type="$ACC" --version="$VERSION" "$@"
    ;;
  setup)
    ROOT="$(cd "$(dirname "$0")/.." && pwd)"
    STAMP="$(mktemp -t llama_jax.XXXXXX)"
    TARBALL="$STAMP.tar.gz"
    [[ -n "$DRY" ]] || trap 'rm -f "$STAMP" "$TARBALL"' EXIT  # (dry: kept, for the scp it prints)
    # one tar reading the whole list (xargs would split a long one over several tars, each
    # overwriting the archive); no local virtualenv: every worker builds its own
    (cd "$ROOT" && git ls-files -co --exclude-standard -z | grep -zv '^venv/' | tar czf "$TARBALL" --null -T -)
    $DRY "${GC[@]}" scp "$TARBALL" "$NAME":llama_jax.tar.gz "${FLAGS[@]}" --worker=all
    # Python >= 3.11 (the TPU images' python3 is Ubuntu 22.04's 3.10, often without venv):
    # the image's own if new enough, else one that uv installs; a venv of an older Python is rebuilt
    ssh_all "mkdir -p $REMOTE && tar xzf llama_jax.tar.gz -C $REMOTE && cd $REMOTE && \
      { [ -x venv/bin/python ] && venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
        rm -rf venv; PY=; for c in python3.13 python3.12 python3.11 python3; do \
          \$c -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && PY=\$c && break; done; \
        if [ -n \"\$PY\" ] && \$PY -m venv venv; then :; else rm -rf venv; \
          command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
          UV=\$(command -v uv || echo \$HOME/.local/bin/uv); \$UV venv --seed --python 3.11 venv; fi; }; } && \
      . venv/bin/activate && pip install -q -U pip && pip install -q -e . 'jax[tpu]' && \
      python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
    if [[ -n "${BUCKET:-}" ]]; then
      # --rename-dir-limit: Orbax writes each checkpoint to a temporary directory and renames
      # it when complete, which gcsfuse refuses on a flat bucket by default
      ssh_all "command -v gcsfuse >/dev/null || { \
          echo 'deb https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -c -s)' main' | \
            sudo tee /etc/apt/sources.list.d/gcsfuse.list && \
          curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && \
          sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; } && \
        mkdir -p $REMOTE/gcs && { mountpoint -q $REMOTE/gcs || \
          gcsfuse --implicit-dirs --rename-dir-limit=200000 $BUCKET $REMOTE/gcs; }"
    fi
    ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    (( $# )) || { echo "run: give the main's flags after --" >&2; exit 2; }
    ARGS="$(printf '%q ' "$@")"
    # refused while a run is going on any worker (two would fight for the TPU, and workers started
    # without their peers would wait for them): every worker is asked before any starts. The log
    # is appended to. ([l] and \$M.main: this shell's own command line must not match the pattern)
    ssh_all "if pgrep -f '[l]lama_jax.main' >/dev/null; then echo \"a run is going on \$(hostname): stop it (or \
      wait for its save) first\" >&2; exit 1; fi" || { echo "run: not started" >&2; exit 1; }
    ssh_all "cd $REMOTE && . venv/bin/activate && mkdir -p logs || exit 1; \
      echo \"== \$(date -u) \" $ARGS >> logs/run.log; M=llama_jax; \
      LLAMA_JAX_DISTRIBUTED=auto nohup python -m \$M.main $ARGS >> logs/run.log 2>&1 < /dev/null & \
      echo started on \$(hostname)"
    ;;
  logs)
    $DRY "${GC[@]}" ssh "$NAME" "${FLAGS[@]}" --worker="${1:-0}" --command="tail -n 100 -F $REMOTE/logs/run.log"
    ;;
  stop)
    # [l]: the pattern does not match the remote shell running pkill, whose command line holds it
    ssh_all "pkill -TERM -f '[l]lama_jax.main' || true"  # each worker saves the step they agree on, then exits
    ;;
  delete)
    $DRY "${GC[@]}" delete "$NAME" "${FLAGS[@]}" --quiet
    ;;
  *)
    echo "unknown command $CMD (create | setup | run | logs | stop | delete)" >&2; exit 2 ;;
esac
