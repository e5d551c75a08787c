"""The scheduler with prefix reuse and speculation gives the plain scheduler's tokens.

Real backend, no HTTP; the reference is the same scheduler without either option. Prompts go in
chunks (prefill_chunk=8) beside running streams, so a one-token middle chunk and a reused slot's
remainder both occur.
"""

from __future__ import annotations

import threading

import numpy as np

from kiln.runtime import load
from kiln.runtime.decode import Event, Sequence
from kiln.runtime.prefix_cache import PrefixCache
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.server.metrics import Metrics
from kiln.runtime.server.scheduler import Job, Scheduler
from kiln.runtime.speculate import NgramDrafter, Speculator


def _submit_all(sched: Scheduler, prompts: list[list[int]], **params: object) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def emit(i: int):  # type: ignore[no-untyped-def]
        def put(item: Event | BaseException) -> None:
            assert isinstance(item, Event), item
            out[i].append(item.token_id)
            if item.finish_reason:
                done[i].set()

        return put

    for i, ids in enumerate(prompts):
        p = SamplingParams(max_new_tokens=20, ignore_eos=True, **params)  # type: ignore[arg-type]
        sched.submit(Job(Sequence(i, ids, p), emit(i)))
    assert all(d.wait(120) for d in done)
    return out


def test_reuse_and_speculation_match_the_plain_scheduler(tiny_static):
    rng = np.random.default_rng(0)
    system = [1, *(int(t) for t in rng.integers(3, 300, 30))]
    turns = [
        [[*system, *(int(t) for t in rng.integers(3, 300, n))] for n in (3, 17, 1)],
        [[*system, 9, *system[5:20]], [1, 2, 3]],
    ]
    results = {}
    for name in ("plain", "reuse+speculate"):
        gen = load(tiny_static, slots=2, device="cpu", threads=1, tokenizer=False, last_only=False)
        cache = PrefixCache(gen.backend) if name != "plain" else None
        spec = Speculator(NgramDrafter(), draft_tokens=3) if name != "plain" else None
        sched = Scheduler(
            gen.backend, Metrics(), prefill_chunk=8, prefix_cache=cache, speculator=spec
        )
        sched.start()
        try:
            got = []
            for batch in turns:
                got += _submit_all(sched, batch)  # greedy
                got += _submit_all(sched, batch, temperature=0.7, seed=3)
            # each answer becomes the next prompt's history, as in a chat
            got += _submit_all(sched, [[*turns[0][0], *got[0], 5, 6]])
        finally:
            sched.stop()
        results[name] = got
        if cache is not None and spec is not None:
            assert cache.stats.hits >= 3 and cache.stats.tokens_saved > 60
            assert spec.stats.accepted > 0
    assert results["reuse+speculate"] == results["plain"]
