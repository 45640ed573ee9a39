#!/usr/bin/env bash
# Stand-in for llama-server in llama.cpp's tools/server/tests (utils.py ServerProcess.start()).
# Use:  LLAMA_SERVER_BIN_PATH=/work/compat-research/kvsnap-llama-server.sh pytest ...
#
# Maps the llama-server command line the harness emits onto `kvsnap serve`. Every model source
# (--hf-repo/--hf-file/--model/--model-url/router "no model") becomes the one local GGUF.
# Flags kvsnap has no equivalent for are dropped (and listed on stderr), never passed on:
# clap would refuse them and the harness would see "Server process died".
set -euo pipefail

KVSNAP_BIN=${KVSNAP_BIN:-/work/main/target/release/kvsnap}
MODEL=${KVSNAP_TEST_MODEL:-/work/main/models/gemma-3-270m-q4_k_m.gguf}
THREADS=${KVSNAP_TEST_THREADS:-2}

# kvsnap reads KVSNAP_* from the environment: keep the caller's out of the test servers.
for v in $(compgen -e | grep '^KVSNAP_' || true); do
  case "$v" in KVSNAP_BIN|KVSNAP_TEST_*) ;; *) unset "$v" ;; esac
done

port=8080
cors='*'    # llama-server's default allows any origin; kvsnap's is localhost
out=()      # kvsnap flags
dropped=()  # llama-server flags with no kvsnap equivalent

while (($#)); do
  f=$1
  case "$f" in
    # ---- mapped (same meaning in kvsnap) ----
    --port)            port=$2; out+=(--port "$2"); shift 2 ;;
    --host)            out+=(--host "${2%%,*}"); shift 2 ;;   # kvsnap binds one address; "127.0.0.1,::1" -> first
    --threads|-t)      THREADS=$2; shift 2 ;;
    --ctx-size|-c)     out+=(--ctx-size "$2"); shift 2 ;;    # total, split by --parallel: same as llama-server
    --parallel|-np)    out+=(--parallel "$2"); shift 2 ;;
    --batch-size|-b)   out+=(--batch-size "$2"); shift 2 ;;
    --ubatch-size|-ub) out+=(--ubatch-size "$2"); shift 2 ;;
    --api-key)         out+=(--api-key "$2"); shift 2 ;;
    --cors-origins)    cors=$2; shift 2 ;;
    --slot-save-path)  out+=(--slot-save-path "$2"); shift 2 ;;
    --chat-template)   out+=(--chat-template "$2"); shift 2 ;;
    -fa|--flash-attn)  case "$2" in on) out+=(--flash-attn on) ;; *) out+=(--flash-attn off) ;; esac; shift 2 ;;
    # ---- model sources: replaced by $MODEL ----
    --model|-m|--model-url|-mu|--hf-repo|-hf|-hfr|--hf-file|-hff|--model-draft|-md|--mmproj-url|-mmu \
    |--models-dir|--models-max|--models-preset|--lora)
                       dropped+=("$f $2"); shift 2 ;;
    # ---- valued flags without a kvsnap equivalent ----
    --temp|--seed|--n-predict|-n|--alias|-a|--tags|-ctk|-ctv|--pooling|--grp-attn-n|--grp-attn-w \
    |--n-gpu-layers|-ngl|--spec-type|--spec-draft-n-max|--spec-draft-n-min \
    |--spec-synth-len|--spec-synth-rates|--reasoning-format|--reasoning|--chat-template-file \
    |--media-path|--sleep-idle-seconds|--cache-ram|--tools|--tools-runtime|--mcp-servers-config \
    |--mcp-servers-json)
                       dropped+=("$f $2"); shift 2 ;;
    # ---- boolean flags without a kvsnap equivalent ----
    --offline|--cont-batching|--embedding|--reranking|--metrics|--kv-unified|--swa-full|--slots \
    |--no-slots|--verbose|--context-shift|--no-ui|--no-models-autoload|--jinja|--no-jinja|--no-mmproj \
    |--no-cache-idle-slots|--ui-mcp-proxy|--backend_sampling)
                       dropped+=("$f"); shift ;;
    *) echo "kvsnap-llama-server: unknown flag '$f' (update the wrapper)" >&2; exit 2 ;;
  esac
done

# A fresh store per start: no state leaks between tests, no redb lock shared by xdist workers.
data_dir=${TMPDIR:-/tmp}/kvsnap-llamatest-$port
rm -rf "$data_dir"; mkdir -p "$data_dir"

cmd=("$KVSNAP_BIN" serve --model "$MODEL" --threads "$THREADS" --data "$data_dir/kvsnap.redb" \
     --shutdown-grace 1 --cors-origins "$cors" "${out[@]}")
echo "kvsnap-llama-server: ${cmd[*]}" >&2
((${#dropped[@]})) && printf 'kvsnap-llama-server: dropped %s\n' "${dropped[@]}" >&2
# exec: the harness stops the server with SIGTERM (then SIGKILL after 5 s) on this pid.
exec "${cmd[@]}"
