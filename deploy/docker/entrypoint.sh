#!/usr/bin/env bash
# Entry point of the hieravid-vllm image.
#
#   entrypoint.sh [serve] [MODEL] [vllm serve flags...]   run `vllm serve` (default)
#   entrypoint.sh ray-head [MODEL] [vllm serve flags...]  start a Ray head, wait for the
#                                                         workers, then `vllm serve` on Ray
#   entrypoint.sh ray-worker                              join the Ray head and block
#
# Environment (all optional; command-line flags given to the container come last and win):
#   MODEL                  model to serve (instead of a positional MODEL argument)
#   HIERAVID_BUDGET        --hieravid-budget (relative video token budget in (0, 1], e.g. 0.3)
#   HIERAVID_MODE          --hieravid-mode (full | input_only)
#   HIERAVID_CONFIG        --hieravid-config (JSON)
#   ALLOWED_MEDIA_DOMAINS  --allowed-media-domains (comma or space separated host names)
#   HOST, PORT             --host / --port (default 0.0.0.0:8000; the health check reads PORT)
#   VLLM_API_KEY           read by vLLM itself (never put on the command line)
#   VLLM_API_KEY_FILE      file holding the API key (docker / Kubernetes secret mount)
#   HF_TOKEN, HF_TOKEN_FILE  Hugging Face token for gated models, same rules
#   ALLOW_UNAUTHENTICATED=1  serve without an API key (development only)
#   RAY_HEAD_ADDRESS, RAY_PORT (6379), RAY_CLUSTER_SIZE (nodes incl. head),
#   RAY_INIT_TIMEOUT (600 s), VLLM_HOST_IP (this node's IP; default: hostname -i)
#   HIERAVID_HOME          where healthcheck.py / ray_wait.py live (default /opt/hieravid)
set -euo pipefail

readonly PLACEHOLDER_KEY="CHANGE_ME"
HIERAVID_HOME=${HIERAVID_HOME:-/opt/hieravid}

log() { printf '[hieravid-entrypoint] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 64; }

# VAR_FILE -> VAR, so secrets arrive as mounted files instead of visible env/args.
load_secret_file() {
  local var=$1 file_var="${1}_FILE" path
  path=${!file_var:-}
  [[ -z $path ]] && return 0
  [[ -r $path ]] || die "$file_var=$path is not readable by uid $(id -u) (check the secret's file mode)"
  local value
  value=$(<"$path")
  value=${value%$'\n'}
  [[ -n $value ]] || die "$file_var=$path is empty"
  export "$var=$value"
}

has_flag() {  # has_flag FLAG ARGS...: is FLAG (or FLAG=value) among ARGS
  local flag=$1 a
  shift
  for a in "$@"; do
    [[ $a == "$flag" || $a == "$flag="* ]] && return 0
  done
  return 1
}

node_ip() {
  if [[ -n ${VLLM_HOST_IP:-} ]]; then
    printf '%s' "$VLLM_HOST_IP"
  else
    hostname -i | awk '{print $1}'
  fi
}

# Fills SERVE_ARGS from the environment followed by the container arguments.
build_serve_args() {
  SERVE_ARGS=()
  if [[ -n ${MODEL:-} ]]; then
    if [[ $# -gt 0 && $1 != -* ]]; then
      die "model given twice: MODEL=$MODEL and argument '$1'"
    fi
    SERVE_ARGS+=("$MODEL")
  elif [[ $# -gt 0 && $1 != -* ]]; then
    SERVE_ARGS+=("$1")
    shift
  elif ! has_flag --model "$@"; then
    die "no model: set MODEL or pass it as the first argument"
  fi
  SERVE_ARGS+=(--host "${HOST:-0.0.0.0}" --port "${PORT:-8000}")
  [[ -n ${HIERAVID_BUDGET:-} ]] && SERVE_ARGS+=(--hieravid-budget "$HIERAVID_BUDGET")
  [[ -n ${HIERAVID_MODE:-} ]] && SERVE_ARGS+=(--hieravid-mode "$HIERAVID_MODE")
  [[ -n ${HIERAVID_CONFIG:-} ]] && SERVE_ARGS+=(--hieravid-config "$HIERAVID_CONFIG")
  if [[ -n ${ALLOWED_MEDIA_DOMAINS:-} ]]; then
    local -a domains
    read -r -a domains <<<"${ALLOWED_MEDIA_DOMAINS//,/ }"
    SERVE_ARGS+=(--allowed-media-domains "${domains[@]}")
  fi
  SERVE_ARGS+=("$@")

  # Safe defaults: refuse to serve without a real API key, warn on risky media settings.
  if [[ ${VLLM_API_KEY:-} == "$PLACEHOLDER_KEY" ]]; then
    die "VLLM_API_KEY is still the placeholder '$PLACEHOLDER_KEY' (deploy/k8s/common/secret.yaml)"
  fi
  if [[ -z ${VLLM_API_KEY:-} ]] && ! has_flag --api-key "${SERVE_ARGS[@]}"; then
    if [[ ${ALLOW_UNAUTHENTICATED:-0} == 1 ]]; then
      log "WARNING: serving without an API key (ALLOW_UNAUTHENTICATED=1)"
    else
      die "no API key: set VLLM_API_KEY or VLLM_API_KEY_FILE (or ALLOW_UNAUTHENTICATED=1 for development)"
    fi
  fi
  if has_flag --allowed-local-media-path "${SERVE_ARGS[@]}"; then
    log "WARNING: --allowed-local-media-path lets clients read server files; not for production"
  fi
  if ! has_flag --allowed-media-domains "${SERVE_ARGS[@]}"; then
    log "WARNING: no --allowed-media-domains / ALLOWED_MEDIA_DOMAINS: media URLs on any host will be fetched"
  fi
}

serve() {
  build_serve_args "$@"
  log "exec vllm serve ${SERVE_ARGS[0]} ... (HieraVid budget: ${HIERAVID_BUDGET:-off})"
  exec vllm serve "${SERVE_ARGS[@]}"
}

ray_head() {
  local ip port=${RAY_PORT:-6379} size=${RAY_CLUSTER_SIZE:-1}
  ip=$(node_ip)
  export VLLM_HOST_IP=$ip
  build_serve_args "$@"
  has_flag --distributed-executor-backend "${SERVE_ARGS[@]}" \
    || SERVE_ARGS+=(--distributed-executor-backend ray)
  log "starting Ray head on $ip:$port, waiting for $size node(s)"
  ray start --head --port="$port" --node-ip-address="$ip"
  python3 "$HIERAVID_HOME/ray_wait.py" "$size" "${RAY_INIT_TIMEOUT:-600}" \
    || die "Ray cluster did not reach $size node(s)"
  log "exec vllm serve ${SERVE_ARGS[0]} ... on Ray (HieraVid budget: ${HIERAVID_BUDGET:-off})"
  exec vllm serve "${SERVE_ARGS[@]}"
}

ray_worker() {
  local ip head=${RAY_HEAD_ADDRESS:?RAY_HEAD_ADDRESS (the head Service name) is required}
  ip=$(node_ip)
  export VLLM_HOST_IP=$ip
  log "joining Ray head $head:${RAY_PORT:-6379} from $ip"
  exec ray start --address="$head:${RAY_PORT:-6379}" --node-ip-address="$ip" --block
}

load_secret_file VLLM_API_KEY
load_secret_file HF_TOKEN
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}

mode=serve
case "${1:-}" in
  serve | ray-head | ray-worker) mode=$1; shift ;;
esac
case $mode in
  serve) serve "$@" ;;
  ray-head) ray_head "$@" ;;
  ray-worker) ray_worker ;;
esac
