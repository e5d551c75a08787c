#!/usr/bin/env bash
# The wheel as a user gets it: build it, install it into fresh venvs with constraints.txt, run it.
#  (a) kiln[export]: --help, export + optimize --target onnxruntime + generate the Zen text, and a
#      static export for serving;
#  (b) kiln[serve] only (asserted: no torch, no transformers): generate from (a)'s artifacts and
#      serve one completion and one chat through the openai client (.ci/serve_memory.py), with the
#      server's resident memory and whether libtorch is mapped.
# Everything runs outside the repository, so only the installed wheel is imported.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="${WHEEL_CHECK_DIR:-$ROOT/build/wheel-check}"
C="$ROOT/constraints.txt"
PROMPT="Beautiful is better than"
rm -rf "$WORK" && mkdir -p "$WORK"
cd "$WORK"
step() { echo "=== wheel check: $*"; }

step "build the wheel"
"$PYTHON" -m pip wheel -q --no-deps "$ROOT" -w dist/
WHEEL="$(ls "$WORK"/dist/kiln-*.whl)"
echo "$(basename "$WHEEL"): $("$PYTHON" -m zipfile -l "$WHEEL" | tail -n +2 | wc -l) files"

step "(a) kiln[export] in a fresh venv"
"$PYTHON" -m venv full
full/bin/pip install -q -c "$C" "torch==2.13.0"  # the local CPU build, first and alone
full/bin/pip install -q -c "$C" "$WHEEL[export]"
full/bin/pip check
full/bin/kiln --version
full/bin/kiln --help > /dev/null
ZEN="$(full/bin/python -c 'from kiln.models.zen import ZEN_DIR; print(ZEN_DIR)')"
full/bin/kiln export "$ZEN" --out art/onnx
full/bin/kiln optimize art/onnx --target onnxruntime --precision fp32 --out art/ort
full/bin/kiln export "$ZEN" --out art/static --kv static --max-context 512
full/bin/kiln generate art/ort --prompt "$PROMPT" --max-new-tokens 400 > zen-a.txt
full/bin/python - zen-a.txt <<'PY'
import sys
from pathlib import Path
from kiln.models.zen import zen_text
got = Path(sys.argv[1]).read_text().rstrip("\n")
assert got == zen_text(), f"kiln generate printed {got[:200]!r}..., not the Zen text"
print("(a) kiln generate printed the Zen text")
PY

step "(b) kiln[serve] only, in a fresh venv"
"$PYTHON" -m venv runtime
runtime/bin/pip install -q -c "$C" "$WHEEL[serve]"
runtime/bin/pip check
du -sh full runtime > sizes.txt  # before the client below joins the runtime venv
runtime/bin/kiln --help > /dev/null
runtime/bin/pip install -q -c "$C" openai  # the official client, for the request below only
runtime/bin/pip check
for heavy in torch transformers; do
    if runtime/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$heavy') is None)"; then
        echo "the runtime-only venv has $heavy installed" >&2; exit 1
    fi
done
for art in art/ort art/static; do
    runtime/bin/kiln generate "$art" --prompt "$PROMPT" --max-new-tokens 400 > zen-b.txt
    cmp zen-a.txt zen-b.txt
done
echo "(b) kiln generate printed the Zen text from both artifacts"
if runtime/bin/kiln export "$ZEN" 2> missing.txt; then echo "export ran without torch" >&2; exit 1; fi
grep -q "needs the 'export' extra: pip install 'kiln\[export\]'" missing.txt
runtime/bin/python "$ROOT/.ci/serve_memory.py" runtime/bin/kiln art/static \
    --expect-prefix "$PROMPT ugly." | tee serve.json
runtime/bin/python -c "import json; r = json.load(open('serve.json')); assert not r['libtorch_mapped'], r"

step "venv sizes (export extra vs runtime only)"
cat sizes.txt
