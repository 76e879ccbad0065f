#!/usr/bin/env bash
# Create (idempotently) the Python 3.11 environment that runs the transformers/PyTorch parity reference
# (tests/parity/hf_reference.py) and lm-eval against the OpenAI-compatible server (tests/eval/test_lm_eval.py).
# CPU torch wheels exist here only for Python 3.11, so this is separate from the project's 3.12 environment.
#
#   scripts/setup_parity_env.sh [VENV_DIR]        default VENV_DIR: <repo>/.venv-parity
#
# Base interpreter: $M1JAX_PARITY_BASE_PYTHON if set, else the first Python 3.11 that can create a venv among
# python3.11 on PATH, ~/.pyenv/versions/3.11*/bin/python, python3. Installs the pinned
# torch==2.13.0 transformers==5.24.0 plus safetensors and numpy, and lm-eval[api]==0.4.13 in the same pip call (so
# the torch pin holds: lm-eval never brings a CUDA torch), checks the imports and that torch is the CPU build, and
# writes marker files holding the pins (.m1jax-parity-ok: the parity pins; .m1jax-lm-eval-ok: lm-eval's); a venv
# with matching markers is left alone. Prints the interpreter path last.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-parity}"
PINS="torch==2.13.0 transformers==5.24.0 safetensors numpy"
EVAL_PINS="lm-eval[api]==0.4.13"
MARKER="$VENV/.m1jax-parity-ok"
EVAL_MARKER="$VENV/.m1jax-lm-eval-ok"

die() { echo "setup_parity_env: ERROR: $*" >&2; exit 1; }

if [[ -x "$VENV/bin/python" && -f "$MARKER" && "$(cat "$MARKER")" == "$PINS" && -f "$EVAL_MARKER" \
      && "$(cat "$EVAL_MARKER")" == "$EVAL_PINS" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi

is_py311() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' >/dev/null 2>&1; }

candidates=()
[[ -n "${M1JAX_PARITY_BASE_PYTHON:-}" ]] && candidates+=("$M1JAX_PARITY_BASE_PYTHON")
command -v python3.11 >/dev/null 2>&1 && candidates+=("$(command -v python3.11)")
for p in "$HOME"/.pyenv/versions/3.11*/bin/python; do [[ -x "$p" ]] && candidates+=("$p"); done
command -v python3 >/dev/null 2>&1 && candidates+=("$(command -v python3)")

if [[ ! -x "$VENV/bin/python" ]] || ! is_py311 "$VENV/bin/python"; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    err="$(mktemp)"
    made=""
    tried=""
    for base in "${candidates[@]}"; do
        tried+=" $base"
        is_py311 "$base" || continue
        if "$base" -m venv "$VENV" >/dev/null 2>"$err"; then
            made="$base"; break
        fi
        echo "setup_parity_env: '$base -m venv' failed: $(tail -n 3 "$err")" >&2
        rm -rf "$VENV"
    done
    rm -f "$err"
    [[ -n "$made" ]] || die "no Python 3.11 able to create a venv (tried:${tried:- nothing}). Install python3.11 (+ python3.11-venv), or point M1JAX_PARITY_BASE_PYTHON at a 3.11 interpreter, or M1JAX_PARITY_PYTHON at a ready interpreter with $PINS."
    echo "setup_parity_env: created $VENV from $made" >&2
fi

# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --disable-pip-version-check -q $PINS "$EVAL_PINS" >&2 \
    || die "pip install $PINS $EVAL_PINS into $VENV failed (torch 2.13.0 CPU wheels exist for Python 3.11 only)."
"$VENV/bin/python" -c 'import torch, transformers, safetensors, numpy; from transformers import MiniMaxForCausalLM' \
    || die "imports failed in $VENV after install."
"$VENV/bin/python" -c 'import torch, lm_eval, aiohttp, tenacity; assert torch.version.cuda is None, torch.version.cuda' \
    || die "lm-eval imports failed in $VENV, or torch is not the CPU build."
echo "$PINS" > "$MARKER"
echo "$EVAL_PINS" > "$EVAL_MARKER"
echo "$VENV/bin/python"
