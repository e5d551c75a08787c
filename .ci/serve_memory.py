"""Start `kiln serve`, send one completion and one chat through the openai client, report memory.

Prints one JSON line: the completion and chat text, the server's resident memory (VmRSS, MB)
after the requests, and whether libtorch is mapped into it. Exits 1 when a request fails.
Usage: python .ci/serve_memory.py KILN_EXECUTABLE ARTIFACT [--expect-prefix TEXT]
(the Python running it needs `openai`; the server runs in KILN_EXECUTABLE's environment).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from openai import OpenAI

PROMPT = "Beautiful is better than"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kiln serve exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"kiln serve not ready after {timeout_s} s")


def _memory(pid: int) -> tuple[float, bool]:
    """VmRSS in MB and whether a libtorch shared object is mapped."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    maps = Path(f"/proc/{pid}/maps").read_text()
    return rss_kb / 1024, "libtorch" in maps


def main() -> int:
    """Serve, request, measure, stop; print the JSON record."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("kiln", help="the kiln executable of the environment under test")
    ap.add_argument("artifact", type=Path, help="static-KV artifact folder")
    ap.add_argument("--expect-prefix", default=None, help="the completion must start with this")
    args = ap.parse_args()
    port = _free_port()
    cmd = [args.kiln, "-q", "serve", str(args.artifact), "--port", str(port), "--slots", "2"]
    cmd += ["--threads", "1"]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        done = client.completions.create(model=name, prompt=PROMPT, max_tokens=24, temperature=0)
        chat = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=8,
            temperature=0,
        )
        rss_mb, libtorch = _memory(proc.pid)
        record = {
            "artifact": str(args.artifact),
            "completion": done.choices[0].text,
            "chat": chat.choices[0].message.content,
            "vmrss_mb": round(rss_mb, 1),
            "libtorch_mapped": libtorch,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(json.dumps(record))
    if args.expect_prefix is not None and not (PROMPT + record["completion"]).startswith(
        args.expect_prefix
    ):
        print(f"completion {record['completion']!r} does not continue the expected text")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
