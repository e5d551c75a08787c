"""`kiln serve ARTIFACT --ray` as a process: it answers, and SIGTERM drains a running stream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from ray_helpers import stream_completion

from kiln.runtime.server.serve import free_port

pytestmark = pytest.mark.ray


def test_sigterm_lets_the_running_stream_finish_then_exits_0(zen_static: Path, tmp_path: Path):
    port = free_port()
    cli = "import sys; from kiln.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", cli, "serve", str(zen_static), "--ray", "--port", str(port)]
    cmd += ["--slots", "2", "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"kiln serve --ray exited with {proc.returncode}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        body = {"model": "zen-llama", "prompt": "The way", "max_tokens": 40, "seed": 1}
        body |= {"temperature": 0.9, "ignore_eos": True}

        async def run():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                live = []
                task = asyncio.create_task(stream_completion(client, body, live=live))
                for _ in range(600):  # bounded: the stream has started
                    if live and live[0].chunks >= 2:
                        break
                    await asyncio.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
                return await task

        got = asyncio.run(run())
        assert (got.status, got.error, got.done, got.chunks) == (200, None, True, 40)
        assert proc.wait(120) == 0
    except BaseException:
        print((tmp_path / "serve.log").read_text()[-4000:])
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
