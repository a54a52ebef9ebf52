#!/usr/bin/env bash
# `make test-rasa`: a real Rasa 3.6 behind the `rasa` connector, and Rasa calling Switchboard's /rasa/webhook.
#
# Builds once, in a cache folder outside the clone (${XDG_CACHE_HOME:-$HOME/.cache}/switchboard):
#   rasa-3.6-venv/           Rasa 3.6.21 in a Python 3.10 venv (Rasa 3.6 requires Python < 3.11; ~7 min, 2.7 GB)
#   rasa-bot-<hash>/bot.tar.gz  the tiny bot of tests/peers/rasa_bot, trained once per change of its files
# then runs tests/connectors/test_rasa_real.py (marked `rasa`). Where no Python 3.10 can be found the test
# is still run, and skips with the reason. `--build-only` stops after the build and the training.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/switchboard"
VENV="${SWITCHBOARD_RASA_VENV:-$CACHE/rasa-3.6-venv}"
REQUIREMENT="rasa==3.6.21"
BOT="$REPO/tests/peers/rasa_bot"
mkdir -p "$CACHE"

find_python310() {
  local candidates=("${SWITCHBOARD_PYTHON310:-}" "$HOME/.pyenv/versions/3.10.13/bin/python")
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.10\.[0-9]+$' || true); do
      candidates+=("$(pyenv root)/versions/$v/bin/python")
    done
  fi
  candidates+=("$(command -v python3.10 || true)")
  for p in "${candidates[@]}"; do
    if [ -n "$p" ] && [ -x "$p" ] && "$p" -c 'import sys, venv; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

started=$(date +%s)
if PY310=$(find_python310); then
  (
    flock -w 1800 9 || { echo "another build holds $VENV.lock" >&2; exit 1; }
    if [ ! -x "$VENV/bin/rasa" ] || [ "$(cat "$VENV/.switchboard-requirement" 2>/dev/null)" != "$REQUIREMENT" ]; then
      echo "== building $VENV with $PY310 ($REQUIREMENT); this takes 7-15 minutes"
      t0=$(date +%s)
      rm -rf "$VENV"
      "$PY310" -m venv "$VENV"
      "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$REQUIREMENT"
      echo "$REQUIREMENT" > "$VENV/.switchboard-requirement"
      echo "== rasa venv built in $(( $(date +%s) - t0 )) s"
    else
      echo "== using the cached $VENV"
    fi
  ) 9>"$VENV.lock"
  HASH=$( (cd "$BOT" && find . -type f | LC_ALL=C sort | xargs sha256sum; echo "$REQUIREMENT") | sha256sum | cut -c1-12)
  MODEL_DIR="$CACHE/rasa-bot-$HASH"
  (
    flock -w 1800 9 || { echo "another run holds $MODEL_DIR.lock" >&2; exit 1; }
    if [ ! -f "$MODEL_DIR/bot.tar.gz" ]; then
      echo "== training the tiny bot into $MODEL_DIR"
      t0=$(date +%s)
      rm -rf "$MODEL_DIR" && mkdir -p "$MODEL_DIR"
      cp -r "$BOT"/. "$MODEL_DIR/project"
      (cd "$MODEL_DIR/project" && RASA_TELEMETRY_ENABLED=false "$VENV/bin/rasa" train \
        --fixed-model-name bot --out "$MODEL_DIR" >"$MODEL_DIR/train.log" 2>&1) \
        || { tail -40 "$MODEL_DIR/train.log"; rm -f "$MODEL_DIR/bot.tar.gz"; exit 1; }
      echo "== trained in $(( $(date +%s) - t0 )) s"
    else
      echo "== using the cached model $MODEL_DIR/bot.tar.gz"
    fi
  ) 9>"$MODEL_DIR.lock"
  export SWITCHBOARD_RASA_VENV="$VENV" SWITCHBOARD_RASA_MODEL="$MODEL_DIR/bot.tar.gz"
  echo "== build and training: $(( $(date +%s) - started )) s"
  [ "${1:-}" = "--build-only" ] && exit 0
else
  export SWITCHBOARD_RASA_SKIP="no Python 3.10 found (Rasa 3.6 needs Python < 3.11): looked at \$SWITCHBOARD_PYTHON310, pyenv's 3.10.x and python3.10 on PATH"
  echo "== $SWITCHBOARD_RASA_SKIP"
  [ "${1:-}" = "--build-only" ] && exit 0
fi
t0=$(date +%s)
"$REPO/.venv/bin/python" -m pytest -m rasa tests/connectors/test_rasa_real.py -v -s -rs -p no:cacheprovider
echo "== test-rasa: tests took $(( $(date +%s) - t0 )) s, $(( $(date +%s) - started )) s in all"
