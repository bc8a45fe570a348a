#!/usr/bin/env bash
# Submit a training run to an existing Ray cluster as a Ray job.
#
#   RAY_ADDRESS=http://HEAD:8265 launchers/ray_submit.sh [RAY_JOB_SUBMIT_OPTIONS... --] \
#       --config CONFIG [--resume-from URL] [section.key=value ...]
#
# It runs, from the repository root:
#
#   ray job submit --address "$RAY_ADDRESS" --runtime-env launchers/runtime_env.yaml \
#       --working-dir . [RAY_JOB_SUBMIT_OPTIONS...] -- python -m mqscale.train ARGS...
#
# The working directory (this repository, minus the excludes in runtime_env.yaml) is uploaded to
# the cluster and is the job's current directory, so `python -m mqscale.train` imports this checkout.
# The driver runs on the head node, where Ray sets RAY_ADDRESS for it: leave `ray.address` unset.
# Local paths in the config are resolved inside that temporary upload directory on the head node,
# which workers on other nodes cannot see and which is deleted afterwards: on a cluster, point
# `data.train_url` and `checkpoint.dir` at object storage (s3://...) or at a shared filesystem.
#
# Token authentication (Ray >= 2.52). Sources: https://docs.ray.io/en/latest/ray-security/token-auth.html,
# https://docs.ray.io/en/master/ray-core/internals/token-authentication.html, and the Ray 2.60 code
# installed by `make venv` (ray/_private/authentication/, ray/scripts/scripts.py, dashboard_sdk.py).
#   * Every node of the cluster and every client must agree: RAY_AUTH_MODE=token enables it.
#     The token is looked up in this order: RAY_AUTH_TOKEN (the token itself), RAY_AUTH_TOKEN_PATH
#     (a file holding it; unreadable or empty is fatal), then ~/.ray/auth_token.
#   * Ray 2.60 defaults when RAY_AUTH_MODE is unset: a new local cluster from ray.init() turns token
#     auth on (and writes ~/.ray/auth_token if missing); `ray start --head` turns it on only if a
#     token already exists (else it warns and runs without auth). The docs' banner says token auth
#     becomes the default for all clusters in Ray 2.61.
#   * The client side of `ray job submit` (JobSubmissionClient) adds the `Authorization: Bearer
#     <token>` header only when token auth is enabled in the *client's* process, i.e. when
#     RAY_AUTH_MODE=token is in its environment; it does not turn itself on because a token file
#     exists (2.60 code). Against a cluster that enforces tokens a submit without it gets HTTP 401.
#     The header travels in clear text over plain http: reach a remote dashboard over TLS or an SSH
#     tunnel (ssh -L 8265:localhost:8265 HEAD, then RAY_ADDRESS=http://localhost:8265).
#   * `ray get-auth-token` prints the token in use to stdout; `ray get-auth-token --generate`
#     first creates one in ~/.ray/auth_token when none exists. Run it where the cluster is started
#     (before `ray start`) and copy that token to the submitting machine: a token generated on a
#     laptop that never reached the cluster is refused.
#   * This script exports RAY_AUTH_MODE=token when RAY_AUTH_MODE is unset and a token is available
#     (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token); RAY_AUTH_MODE=disabled opts out.
#     It never generates or prints a token, and never puts one into the runtime environment
#     (runtime envs are shown in the dashboard's job details).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: RAY_ADDRESS=http://HEAD:8265 launchers/ray_submit.sh [RAY_JOB_SUBMIT_OPTIONS... --] \
           --config CONFIG [--resume-from URL] [section.key=value ...]

Submits `python -m mqscale.train ARGS` to the Ray cluster at $RAY_ADDRESS (the dashboard
address) with launchers/runtime_env.yaml and this repository as the working directory.
Options before a `--` go to `ray job submit` (e.g. --no-wait, --submission-id ID).

example:
  export RAY_ADDRESS=http://head:8265 RAY_AUTH_TOKEN_PATH=~/.ray/cluster_token
  launchers/ray_submit.sh --config configs/stackformer/1.4b.yaml \
      data.train_url=s3://bucket/tokens/train checkpoint.dir=s3://bucket/runs \
      ray.num_workers=16 ray.use_gpu=true ray.cpus_per_worker=8 ray.max_failures=3

environment:
  RAY_ADDRESS          dashboard address of the cluster (required), e.g. http://head:8265
  RAY_AUTH_MODE        token | disabled; set to token automatically when a token is found
  RAY_AUTH_TOKEN       the cluster's token, or
  RAY_AUTH_TOKEN_PATH  a file holding it (default file: ~/.ray/auth_token)
  RUNTIME_ENV          runtime env YAML (default: launchers/runtime_env.yaml)
EOF
}

die() { echo "ray_submit.sh: $*" >&2; exit 2; }

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
case "$1" in
  -h|--help) usage; exit 0 ;;
esac

# Split [RAY_JOB_SUBMIT_OPTIONS... --] from the training arguments.
submit_opts=()
train_args=("$@")
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == "--" ]]; then
    submit_opts=("${@:1:i-1}")
    train_args=("${@:i+1}")
    break
  fi
done
[[ ${#train_args[@]} -gt 0 ]] || die "no training arguments after '--' (need at least --config CONFIG)"

[[ -n "${RAY_ADDRESS:-}" ]] || die "RAY_ADDRESS is not set: export RAY_ADDRESS=http://HEAD:8265 (the dashboard address)"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
runtime_env="${RUNTIME_ENV:-launchers/runtime_env.yaml}"
[[ -f "$runtime_env" ]] || die "runtime env file not found: $runtime_env"

# Token authentication: see the header of this file.
if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
  if [[ -n "${RAY_AUTH_TOKEN:-}" || -n "${RAY_AUTH_TOKEN_PATH:-}" || -f "${HOME:-/nonexistent}/.ray/auth_token" ]]; then
    export RAY_AUTH_MODE=token
    echo "ray_submit.sh: token found, using RAY_AUTH_MODE=token" >&2
  fi
fi
if [[ "${RAY_AUTH_MODE:-}" == "token" && -z "${RAY_AUTH_TOKEN:-}" ]]; then
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    # Ray aborts on an unreadable or empty RAY_AUTH_TOKEN_PATH; say so before contacting anyone.
    [[ -s "$RAY_AUTH_TOKEN_PATH" && -r "$RAY_AUTH_TOKEN_PATH" ]] \
      || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing, empty or unreadable"
  elif [[ ! -s "${HOME:-/nonexistent}/.ray/auth_token" ]]; then
    die "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token in ~/.ray/auth_token"
  fi
fi

command -v ray >/dev/null 2>&1 || die "the 'ray' CLI is not on PATH (pip install 'ray[default]')"

set -x
exec ray job submit --address "$RAY_ADDRESS" --runtime-env "$runtime_env" --working-dir . \
  ${submit_opts[@]+"${submit_opts[@]}"} -- python -m mqscale.train "${train_args[@]}"
