#!/usr/bin/env bash
# Train without Ray: DeepSpeed's own launcher starts the processes, each runs the same training loop.
#
#   [HOSTFILE=launchers/hostfile] [NUM_GPUS=8] launchers/deepspeed.sh \
#       --config CONFIG [--resume-from URL] [section.key=value ...]
#
# It runs, from the repository root:
#
#   deepspeed [--hostfile "$HOSTFILE"] [--num_nodes N] [--num_gpus G] [$DS_ARGS...] \
#       --module mqscale.train --launcher deepspeed ARGS...
#
# `--module` is a flag of the DeepSpeed launcher (run the script as `python -m`); `mqscale.train` is
# its user_script, and everything after it goes to mqscale.train. `--launcher deepspeed` there is
# mqscale.train's own flag (use the processes DeepSpeed started, not Ray); DeepSpeed's launcher has
# a `--launcher` flag too (pdsh/openmpi/slurm/...), which goes before --module, e.g. in DS_ARGS.
# The world size is whatever the launcher starts (ray.num_workers is not used); the run directory
# is `checkpoint.dir`/`name` as with Ray, and checkpoints are interchangeable between the two.
#
# Without HOSTFILE this trains on the local machine only (all its GPUs, or NUM_GPUS of them; on a
# CPU-only machine `NUM_GPUS=2` starts 2 processes on gloo). With HOSTFILE (see
# launchers/hostfile.example) DeepSpeed reaches the other nodes by passwordless ssh (pdsh by
# default) and runs `cd $PWD; python -m mqscale.train ...` there: the repository and its virtual
# environment must sit at the same path on every node (a shared filesystem), and `data.train_url`
# and `checkpoint.dir` must be shared paths or object storage. Environment variables that reach
# remote nodes: names starting with PYTHON, MLFLOW, MV2 or UCX, plus NCCL on CUDA, plus the
# KEY=VALUE lines of ~/.deepspeed_env and ./.deepspeed_env (DeepSpeed 0.19 runner.py).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: [HOSTFILE=FILE] [NUM_NODES=N] [NUM_GPUS=G] [DS_ARGS='...'] launchers/deepspeed.sh \
           --config CONFIG [--resume-from URL] [section.key=value ...]

Runs `deepspeed ... --module mqscale.train --launcher deepspeed ARGS` from the repository root.

examples:
  NUM_GPUS=8 launchers/deepspeed.sh --config configs/stackformer/307m.yaml deepspeed.zero_stage=2
  HOSTFILE=launchers/hostfile launchers/deepspeed.sh --config configs/stackformer/3b.yaml \
      data.train_url=s3://bucket/tokens/train checkpoint.dir=s3://bucket/runs
  NUM_GPUS=2 launchers/deepspeed.sh --config configs/demo.yaml train.max_steps=20
      # CPU: 2 processes on gloo, on the demo shards that `make demo` builds

environment:
  HOSTFILE     DeepSpeed hostfile ("host slots=N" lines); unset = this machine only
  NUM_NODES    use the first N hosts of the hostfile            (--num_nodes)
  NUM_GPUS     processes (GPUs) per node                        (--num_gpus)
  MASTER_ADDR  address of the rank-0 node                       (--master_addr)
  MASTER_PORT  its rendezvous port, default 29500               (--master_port)
  DS_ARGS      more DeepSpeed launcher flags, split on spaces, e.g. DS_ARGS='--launcher openmpi'
  DEEPSPEED    the launcher command (default: deepspeed on PATH, else .venv/bin/deepspeed)
EOF
}

die() { echo "deepspeed.sh: $*" >&2; exit 2; }

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
case "$1" in
  -h|--help) usage; exit 0 ;;
esac

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

ds_args=()
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE not found (see launchers/hostfile.example)"
  ds_args+=(--hostfile "$HOSTFILE")
fi
[[ -z "${NUM_NODES:-}" ]] || ds_args+=(--num_nodes "$NUM_NODES")
[[ -z "${NUM_GPUS:-}" ]] || ds_args+=(--num_gpus "$NUM_GPUS")
[[ -z "${MASTER_ADDR:-}" ]] || ds_args+=(--master_addr "$MASTER_ADDR")
[[ -z "${MASTER_PORT:-}" ]] || ds_args+=(--master_port "$MASTER_PORT")
extra=()
[[ -z "${DS_ARGS:-}" ]] || read -r -a extra <<< "$DS_ARGS"

launcher="${DEEPSPEED:-}"
if [[ -z "$launcher" ]]; then
  if command -v deepspeed >/dev/null 2>&1; then
    launcher=deepspeed
  elif [[ -x .venv/bin/deepspeed ]]; then
    launcher=.venv/bin/deepspeed
  else
    die "the 'deepspeed' launcher is not on PATH (run make venv, or activate the environment)"
  fi
fi

set -x
exec "$launcher" ${ds_args[@]+"${ds_args[@]}"} ${extra[@]+"${extra[@]}"} \
  --module mqscale.train --launcher deepspeed "$@"
