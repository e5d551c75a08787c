"""llama.cpp's own speculative decoding as runners beside kiln's (bench/speculate_bench.py).

Which llama.cpp program: `llama-server`, one process per setting (plain, prompt lookup, draft
model), each started once and driven in turn. The alternatives in the vendored llama.cpp
(examples/lookup `llama-lookup`, examples/speculative-simple `llama-speculative-simple`) take a
text prompt and print text: they cannot be given the exact token ids kiln is given (the GGUFs
here carry a stand-in tokenizer, bench/llamacpp_runner.py) and their output cannot be checked
token for token. llama-server takes a prompt of token ids (tools/server/server-common.cpp
`tokenize_mixed`: no BOS is added to an id prompt), returns the generated ids (`return_tokens`)
and runs the same `common_speculative` code (common/speculative.cpp) the examples do. (Source
paths here are in the vendored llama.cpp, build/llamacpp/llama_cpp_python-*/vendor/llama.cpp
after `make bench-deps`, which already builds llama-server: no further cmake target is needed.)

Settings of every llama.cpp runner: the GGUF of the same weights at F32 (kiln's target is an
fp32 export), `-t T -tb T` (kiln's --threads), one slot, greedy (`temperature` 0 and `top_k`
1), `ignore_eos`, exactly `n_predict` tokens, no prompt reuse between runs (`cache_prompt`
false, `--cache-ram 0`); everything else at llama-server's defaults.
- lookup: `--spec-type ngram-simple --spec-ngram-simple-size-n N --spec-ngram-simple-size-m K`
  (common/ngram-map.cpp `common_ngram_simple_draft`: the K tokens after the latest earlier
  occurrence of the last N tokens). kiln's NgramDrafter backs off from a 3-gram to a 1-gram; the
  server's other lookup, `ngram-cache` (llama-lookup's statistics), drafts a fixed 8.
- draft model: `-md` the Q4_0 GGUF of the same model (llama.cpp's quantizer, default
  parameters), `--spec-draft-n-max K --spec-draft-n-min 0 --spec-draft-p-min 0` (always K greedy
  drafts, as kiln's DraftModelDrafter), the draft on the same threads (`-td` defaults to `-t`).

Timings are the server's own (`timings` in the /completion answer, tools/server/server-common.h
`server_slot_stats`): `predicted_ms` runs from the first sampled token to the last and
`predicted_per_second` = (`predicted_n` - 1) / `predicted_ms`: the definition kiln's decode
rate uses (first event to last). A verify pass that accepts `a` drafts emits a + 1 tokens and a
plain step emits 1, so target passes = (predicted_n - 1) - draft_n_accepted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.llamacpp_runner import LLAMA_SERVER


@dataclass(frozen=True)
class Completion:
    """One llama-server completion: the generated ids and the server's decode figures."""

    tokens: list[int]
    prompt_n: int
    predicted_n: int
    predicted_ms: float
    drafted: int
    accepted: int

    @property
    def tok_s(self) -> float:
        """Decode tokens per second: (tokens - 1) over first-to-last token time."""
        return (self.predicted_n - 1) / (self.predicted_ms / 1e3)

    @property
    def passes(self) -> int:
        """Target forward passes after the first token (verify passes and plain steps)."""
        return self.predicted_n - 1 - self.accepted


def parse_completion(body: dict[str, Any], prompt_len: int, new: int) -> Completion:
    """The figures of a /completion answer; ValueError when it is not the run that was asked.

    The run must have read exactly the prompt's ids (no BOS added, nothing cached) and made
    exactly `new` tokens, or its rate would not be comparable.
    """
    t = body.get("timings")
    tokens = body.get("tokens")
    if not isinstance(t, dict) or not isinstance(tokens, list):
        raise ValueError(f"no timings/tokens in the answer (keys {sorted(body)})")
    c = Completion(
        tokens=[int(x) for x in tokens],
        prompt_n=int(t["prompt_n"]) + int(t.get("cache_n", 0)),
        predicted_n=int(t["predicted_n"]),
        predicted_ms=float(t["predicted_ms"]),
        drafted=int(t.get("draft_n", 0)),
        accepted=int(t.get("draft_n_accepted", 0)),
    )
    if c.prompt_n != prompt_len or t.get("cache_n", 0):
        raise ValueError(
            f"the server read {t['prompt_n']} prompt tokens (+{t.get('cache_n', 0)} cached), "
            f"not the {prompt_len} sent"
        )
    if c.predicted_n != new or len(c.tokens) != new:
        raise ValueError(f"{c.predicted_n} tokens ({len(c.tokens)} ids) made, not {new}")
    return c


def runner_flags(
    ks: list[int], ngram_n: int, draft_gguf: Path | None, draft_k: int
) -> dict[str, tuple[str, list[str]]]:
    """(what it is, llama-server flags) per runner name: plain, lookup per k, draft model."""
    runners: dict[str, tuple[str, list[str]]] = {"llama.cpp plain": ("F32 GGUF", [])}
    for k in ks:
        runners[f"llama.cpp ngram k={k}"] = (f"F32 GGUF, ngram-simple n={ngram_n}, k={k}", [
            *("--spec-type", "ngram-simple"),
            *("--spec-ngram-simple-size-n", str(ngram_n), "--spec-ngram-simple-size-m", str(k)),
        ])  # fmt: skip
    if draft_gguf is not None:
        what = f"F32 GGUF, draft {draft_gguf.name}, k={draft_k}"
        runners[f"llama.cpp Q4_0 draft k={draft_k}"] = (what, [
            *("-md", str(draft_gguf), "--spec-type", "draft-simple"),
            *("--spec-draft-n-max", str(draft_k), "--spec-draft-n-min", "0"),
            *("--spec-draft-p-min", "0"),
        ])  # fmt: skip
    return runners


class LlamaServer:
    """A llama-server on a free loopback port, with `flags`; `complete` runs one greedy call."""

    def __init__(
        self, gguf: Path, threads: int, n_ctx: int, flags: list[str], log: Path,
        program: Path = LLAMA_SERVER,
    ) -> None:  # fmt: skip
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.command = [
            *(str(program), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
            *("-np", "1", "-c", str(n_ctx), "-t", str(threads), "-tb", str(threads)),
            *("--cache-ram", "0", "--no-webui", *flags),
        ]
        env = dict(os.environ)  # llama.cpp's shared libraries sit beside its programs
        env["LD_LIBRARY_PATH"] = f"{program.parent}:{env.get('LD_LIBRARY_PATH', '')}"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            self.proc = subprocess.Popen(self.command, env=env, stdout=f, stderr=f)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {log}")
            try:
                if self._call("/health", None).get("status") == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"llama-server was not ready after 300 s; see {log}")
            time.sleep(0.25)

    def _call(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out: dict[str, Any] = json.loads(r.read())
            return out

    def complete(self, prompt: list[int], new: int) -> Completion:
        """Exactly `new` greedy tokens after `prompt` (ids), EOS ignored, nothing cached."""
        body = {"prompt": prompt, "n_predict": new, "temperature": 0.0, "top_k": 1,
                "ignore_eos": True, "return_tokens": True, "cache_prompt": False}  # fmt: skip
        return parse_completion(self._call("/completion", body), len(prompt), new)

    def close(self) -> None:
        """Stop the server (and wait for it)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
