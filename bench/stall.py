"""What a newcomer's prefill costs the running streams: inter-token gaps around an admission.

`slots - 1` sequences decode; then a request with a long prompt arrives and is prefilled in the
same steps as their decode (in chunks of `prefill_chunk` tokens, or whole with 0). Per chunk
size this reports the running streams' median and worst gap between tokens while the prompt
is fed, and the newcomer's time to first token. Runs the real scheduler and slot backend, no
HTTP. `python -m bench.stall ARTIFACT`.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from kiln.runtime.decode import Event, Sequence
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.server.metrics import Metrics
from kiln.runtime.server.scheduler import Job, Scheduler


def measure(gen: Any, *, prompt_len: int, chunk: int, running: int, decode: int) -> dict:
    """One admission: the running streams' gaps (ms) and the newcomer's TTFT (ms)."""
    sched = Scheduler(gen.backend, Metrics(), prefill_chunk=chunk)
    sched.start()
    stamps: list[list[float]] = [[] for _ in range(running)]
    first = threading.Event()
    arrival: list[float] = []

    def job(i: int, ids: list[int], n: int) -> Job:
        def emit(item: Event | BaseException, i: int = i) -> None:
            if i < running:
                stamps[i].append(time.perf_counter())
            elif not first.is_set():
                arrival.append(time.perf_counter())
                first.set()

        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        return Job(Sequence(i, ids, params, tuple(gen.info.eos_ids)), emit)

    for i in range(running):
        sched.submit(job(i, [1, 2 + i], decode))
    while min(len(s) for s in stamps) < decode // 3:  # all running streams are in steady state
        time.sleep(0.001)
    newcomer = job(running, [3 + t % 50 for t in range(prompt_len)], 1)
    t_submit = time.perf_counter()
    sched.submit(newcomer)
    first.wait(60)
    sched.stop(60)
    before = [np.diff([t for t in s if t < t_submit]) for s in stamps]
    during = [np.diff([t for t in s if t_submit - 0.05 <= t <= arrival[0] + 0.05]) for s in stamps]
    steady = np.concatenate(before)
    hit = np.concatenate([d for d in during if d.size])
    return {
        "prefill_chunk": chunk or prompt_len,
        "prompt_tokens": prompt_len,
        "steady_gap_p50_ms": round(float(np.median(steady)) * 1e3, 2),
        "gap_during_prefill_p50_ms": round(float(np.median(hit)) * 1e3, 2),
        "gap_during_prefill_max_ms": round(float(hit.max()) * 1e3, 2),
        "newcomer_ttft_ms": round((arrival[0] - t_submit) * 1e3, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure each chunk size; print a table and write stall.json."""
    p = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__)
    p.add_argument("artifact", type=Path)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--chunks", default="0,128,64,32,16", help="prefill chunk sizes (0: whole)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/load"))
    args = p.parse_args(argv)
    from kiln.runtime import load

    gen = load(args.artifact, slots=args.slots, threads=args.threads, tokenizer=False, spin=False)
    decode = min(gen.backend.max_context - 4, 200)
    rows = [
        measure(
            gen, prompt_len=args.prompt_len, chunk=int(c), running=args.slots - 1, decode=decode
        )
        for c in args.chunks.split(",")
    ]
    print(f"{args.slots - 1} streams decoding on {gen.backend.name}; a {args.prompt_len}-token "
          "prompt arrives")  # fmt: skip
    head = list(rows[0])
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join(str(r[k]) for k in head))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stall.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
