#!/usr/bin/env bash
# The `llama-server` llama.cpp's own server tests start (tools/server/tests, utils.py
# ServerProcess): `make compat` points LLAMA_SERVER_BIN_PATH here. It maps the harness's
# command line onto one of two real servers, both on this project's default model:
#
#   COMPAT_SERVER=kvsnap        `kvsnap serve` (COMPAT_KVSNAP), with a fresh store per start
#   COMPAT_SERVER=llama-server  llama.cpp's own server (COMPAT_LLAMA_SERVER), the yardstick
#
# Both get the same change: every model source the harness names (a Hugging Face repo, a URL,
# a router with no model at all) becomes `-m COMPAT_MODEL`, since nothing here may download
# weights. For kvsnap, the flags it has no use for are dropped and listed on stderr; the
# flags whose behaviour the tests check are passed on, so kvsnap must implement them.
set -euo pipefail

: "${COMPAT_SERVER:?set COMPAT_SERVER to kvsnap or llama-server}"
: "${COMPAT_MODEL:?set COMPAT_MODEL to the GGUF both servers load}"

# kvsnap reads KVSNAP_* from the environment: keep the caller's out of the test servers.
for v in $(compgen -e | grep '^KVSNAP_' || true); do unset "$v"; done

is_model_source() {
  case "$1" in
    --model|-m|--model-url|-mu|--hf-repo|-hf|-hfr|--hf-file|-hff|--model-draft|-md|--mmproj-url|-mmu \
    |--models-dir|--models-max|--models-preset|--lora) return 0 ;;
  esac
  return 1
}

if [ "$COMPAT_SERVER" = llama-server ]; then
  : "${COMPAT_LLAMA_SERVER:?set COMPAT_LLAMA_SERVER to the llama-server binary}"
  args=()
  while (($#)); do
    if is_model_source "$1"; then shift 2; else args+=("$1"); shift; fi
  done
  exec "$COMPAT_LLAMA_SERVER" -m "$COMPAT_MODEL" "${args[@]}"
fi

[ "$COMPAT_SERVER" = kvsnap ] || { echo "COMPAT_SERVER must be kvsnap or llama-server" >&2; exit 2; }
: "${COMPAT_KVSNAP:?set COMPAT_KVSNAP to the kvsnap binary}"

port=8080
cors='*'    # llama-server's default allows any origin (localhost with --tools); kvsnap's is localhost
cors_given=false
metrics=--no-metrics  # llama-server serves /metrics only with --metrics; kvsnap by default
out=()      # kvsnap flags
dropped=()  # llama-server flags kvsnap has no use for

while (($#)); do
  f=$1
  if is_model_source "$f"; then dropped+=("$f $2"); shift 2; continue; fi
  case "$f" in
    --port)            port=$2; out+=(--port "$2"); shift 2 ;;
    --cors-origins)    cors=$2; cors_given=true; shift 2 ;;
    --metrics)         metrics=--metrics; shift ;;
    --tools)           $cors_given || cors=localhost; dropped+=("$f $2"); shift 2 ;;
    # valued flags kvsnap takes under the same name and meaning
    --host|--threads|-t|--ctx-size|-c|--parallel|-np|--batch-size|-b|--ubatch-size|-ub|--api-key \
    |--slot-save-path|--chat-template|--chat-template-file|--temp|--seed|--n-predict|-n|--alias \
    |--tags|-fa|--flash-attn|-ctk|-ctv|--sleep-idle-seconds)
                       out+=("$f" "$2"); shift 2 ;;
    # switches kvsnap takes under the same name and meaning
    --slots|--no-slots|--kv-unified|--swa-full|--jinja|--no-jinja|--context-shift|--verbose)
                       out+=("$f"); shift ;;
    # valued flags for features kvsnap does not have (see README: out of scope)
    --pooling|--grp-attn-n|--grp-attn-w|--n-gpu-layers|-ngl|--spec-type|--spec-draft-n-max \
    |--spec-draft-n-min|--spec-synth-len|--spec-synth-rates|--reasoning-format|--reasoning \
    |--media-path|--cache-ram|--tools-runtime|--mcp-servers-config \
    |--mcp-servers-json)
                       dropped+=("$f $2"); shift 2 ;;
    --offline|--cont-batching|--embedding|--reranking|--no-ui|--no-models-autoload|--no-mmproj \
    |--no-cache-idle-slots|--ui-mcp-proxy|--backend_sampling)
                       dropped+=("$f"); shift ;;
    *) echo "compat wrapper: unknown llama-server flag '$f' (teach tests/compat/llama-server.sh)" >&2; exit 2 ;;
  esac
done

# A fresh store per start: no state leaks from one test's server into the next.
data_dir=${TMPDIR:-/tmp}/kvsnap-compat-$port
rm -rf "$data_dir"; mkdir -p "$data_dir"

cmd=("$COMPAT_KVSNAP" serve --model "$COMPAT_MODEL" --data "$data_dir/kvsnap.redb" \
     --shutdown-grace 1 --cors-origins "$cors" "$metrics" "${out[@]}")
echo "compat wrapper: ${cmd[*]}" >&2
if ((${#dropped[@]})); then printf 'compat wrapper: dropped %s\n' "${dropped[@]}" >&2; fi
# exec: the harness stops the server with SIGTERM (then SIGKILL) on this very pid.
exec "${cmd[@]}"
