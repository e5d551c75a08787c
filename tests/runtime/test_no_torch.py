"""The runtime imports neither torch nor transformers: `kiln generate`, load, serving a chat.

Each check runs in a fresh interpreter (this one has torch loaded by the export fixtures) and
asserts on its sys.modules after the work is done.
"""

from __future__ import annotations

import json
import subprocess
import sys

from kiln.models.zen import ZEN_PROMPT, zen_text

GENERATE = """
import json, sys
from kiln.cli import main
from kiln.runtime import load
assert main(["generate", sys.argv[1], "--prompt", sys.argv[2], "--max-new-tokens", "8"]) == 0
gen = load(sys.argv[1], device="cpu", threads=1)
done = gen.generate(sys.argv[2], max_new_tokens=40)
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
print(json.dumps({"text": done.text, "heavy": heavy}))
"""

SERVE_CHAT = """
import json, sys
import httpx2 as httpx
from kiln.runtime.server import LiveServer, ServerState
from kiln.runtime.server.serve import slots_loader
state = ServerState(slots_loader(sys.argv[1], slots=2, backend="auto", device="cpu", threads=1))
srv = LiveServer(state).start()
body = {"messages": [{"role": "user", "content": "Beautiful is better than"}], "max_tokens": 8,
        "temperature": 0}
r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)
srv.stop()
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
print(json.dumps({"status": r.status_code, "usage": r.json().get("usage"), "heavy": heavy}))
"""


def _run(script: str, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_load_and_generate_without_torch(exported):
    out = _run(GENERATE, str(exported("zen")), ZEN_PROMPT)
    assert out["heavy"] == []
    assert zen_text().startswith(ZEN_PROMPT + out["text"]) and len(out["text"]) > 40


def test_serve_a_chat_without_torch(exported):
    out = _run(SERVE_CHAT, str(exported("zen", "fp32", kv="static")))
    assert out["status"] == 200
    assert out["usage"]["completion_tokens"] == 8
    assert out["heavy"] == []
