#!/usr/bin/env bash
# Runs llama.cpp's own server tests (the files issues 11 and 32 name) against one server through
# tests/compat/llama-server.sh, and leaves pytest's JUnit report in $COMPAT_OUT/<server>.xml.
#   tests/compat/run.sh kvsnap|llama-server
# Needs: COMPAT_SUITE (llama.cpp's tools/server/tests), COMPAT_VENV (python with the suite's
# requirements), COMPAT_MODEL, COMPAT_KVSNAP or COMPAT_LLAMA_SERVER, COMPAT_OUT.
# Extra pytest arguments may come in COMPAT_PYTEST_ARGS (for example `-k test_n_probs`).
set -euo pipefail

server=$1
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$COMPAT_OUT"
report=$(cd "$COMPAT_OUT" && pwd)/$server.xml

# Left out (14 of the suite's 27): files that need a model of another kind or a network --
# embedding, rerank, infill, lora, speculative, vision_api (their own hub models), tool_call,
# tools_builtin, template and mcp_servers (jinja templates with tool parsing, built-in tools,
# MCP servers), router, proxy and stream (llama-server's multi-model router: in this sdist
# test_stream.py starts a router and resumes streams across model loads through its
# /v1/stream route), compat_gcp (Vertex AI's route shapes over a router).
files=(unit/test_basic.py unit/test_tokenize.py unit/test_completion.py
       unit/test_chat_completion.py unit/test_slot_save.py unit/test_security.py
       unit/test_metrics.py unit/test_ctx_shift.py
       unit/test_compat_anthropic.py unit/test_compat_oai_responses.py unit/test_sleep.py
       unit/test_ignore_eos.py unit/test_kv_keep_only_active.py)

# The tests' paths (./tmp, ../../../models/templates) are relative to the suite's folder.
cd "$COMPAT_SUITE"
rm -rf tmp
echo "compat: llama.cpp's server tests against $server (one test at a time: the servers share two cores)"
# Serial on purpose: every test starts its own server with all cores' threads.
set +e
COMPAT_SERVER=$server LLAMA_SERVER_BIN_PATH=$here/llama-server.sh PORT=${COMPAT_PORT:-18080} \
  "$COMPAT_VENV/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider --junitxml "$report" \
  ${COMPAT_PYTEST_ARGS:-} "${files[@]}" > "$COMPAT_OUT/$server.log" 2>&1
status=$?
set -e
tail -n 3 "$COMPAT_OUT/$server.log"
# pytest exits 1 when tests failed, which is a result here, not an error; other codes are.
if [ "$status" -gt 1 ]; then
  echo "compat: pytest could not run the suite against $server (exit $status); see $COMPAT_OUT/$server.log" >&2
  exit "$status"
fi
