#!/usr/bin/env bash
# Create ./.venv (once) and install codeneo with its dev, CPU-torch and Spark extras into it, plus a
# headless Java runtime for Spark when `java` is missing and bubblewrap (the HumanEval sandbox) when
# `bwrap` is. Sourced by quickstart.sh and test.sh; re-installs only when pyproject.toml (or the
# extras list) changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CODENEO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
EXTRAS="dev,torch,spark"

# Spark (the `spark` extra, its tests) runs on a JVM: Java 17 (or 21), headless is enough.
if ! command -v java >/dev/null 2>&1 && [ -z "${JAVA_HOME:-}" ]; then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo -n)
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then
    echo "[setup] no java on PATH: installing openjdk-17-jre-headless with apt-get (for Spark)"
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq openjdk-17-jre-headless >/dev/null \
      || DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq default-jre-headless >/dev/null
  else
    echo "[setup] no java on PATH and no way to install it here (needs apt-get and root or passwordless sudo):" \
         "install a Java 17 runtime (apt-get install -y openjdk-17-jre-headless) or set JAVA_HOME;" \
         "the Spark tests fail until then" >&2
  fi
fi

# HumanEval runs untrusted completions in a bubblewrap sandbox (train/evaluation/sandbox.py) and
# refuses to run them without one.
if ! command -v bwrap >/dev/null 2>&1; then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo -n)
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then
    echo "[setup] no bwrap on PATH: installing bubblewrap with apt-get (the HumanEval sandbox)"
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq bubblewrap >/dev/null
  else
    echo "[setup] no bwrap on PATH and no way to install it here (needs apt-get and root or passwordless sudo):" \
         "install bubblewrap (apt-get install -y bubblewrap); HumanEval evaluation refuses to run" \
         "and its tests fail until then" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.codeneo-installed"
want="$( (cat "$ROOT/pyproject.toml"; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing codeneo[$EXTRAS] into $VENV (first time: a few minutes)"
  # --no-compile: pip would byte-compile all ~19k .py files of the dependencies (about two
  # minutes of a 2-core CI run, measured: 16 s for torch's 2.3k); Python compiles what it
  # imports, once, on first use.
  "$VENV/bin/python" -m pip install -q --no-compile -e "$ROOT[$EXTRAS]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
