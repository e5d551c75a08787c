"""The scheduler alone (no HTTP): chunked prefill next to running streams changes no token."""

from __future__ import annotations

import itertools
import threading
import time

from kiln.runtime import load
from kiln.runtime.decode import Event, Sequence
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.server.metrics import Metrics
from kiln.runtime.server.scheduler import Job, Scheduler
from kiln.runtime.slots import SlotFeed


class CountingSteps:
    """The real backend; records each step's feeds (slot, token count).

    Each step is held 5 ms longer, so a stream's 30 tokens outlast the test thread's hand-off
    to the next submit even on a loaded machine (the tiny model decodes 30 tokens in ~10 ms,
    and once the first stream had finished before the 45-token prompt arrived).
    """

    def __init__(self, backend) -> None:
        self._backend = backend
        self.fed: list[list[tuple[int, int]]] = []

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def step(self, feeds: list[SlotFeed]):
        self.fed.append([(f.slot, len(f.tokens)) for f in feeds])
        time.sleep(0.005)
        return self._backend.step(feeds)


def _run(
    sched: Scheduler, prompts: list[list[int]], *, stagger: bool, seed: int = 0
) -> list[list[int]]:
    """Submit the prompts (the later ones once the first decodes); return each one's tokens."""
    out: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    started = threading.Event()

    def emit(i: int):
        def put(item: Event | BaseException) -> None:
            assert isinstance(item, Event), item
            out[i].append(item.token_id)
            started.set()
            if item.finish_reason:
                done[i].set()

        return put

    for i, ids in enumerate(prompts):
        if stagger and i == 1:
            assert started.wait(30)
        params = SamplingParams(max_new_tokens=30, temperature=0.8, seed=seed + i, ignore_eos=True)
        sched.submit(Job(Sequence(i, ids, params), emit(i)))
    assert all(d.wait(60) for d in done)
    return out


def test_chunked_prefill_beside_decoding_equals_each_prompt_alone(tiny_static):
    gen = load(tiny_static, slots=3, device="cpu", threads=1, tokenizer=False)
    backend = CountingSteps(gen.backend)
    sched = Scheduler(backend, Metrics(), prefill_chunk=8)
    sched.start()
    try:
        prompts = [[1, 2, 3], [5 + t % 200 for t in range(45)], [7 + t % 90 for t in range(20)]]
        alone = [_run(sched, [p], stagger=False, seed=i)[0] for i, p in enumerate(prompts)]
        backend.fed.clear()
        together = _run(sched, prompts, stagger=True)
    finally:
        sched.stop()
    assert together == alone
    widths = [n for step in backend.fed for _, n in step]
    assert max(widths) == 8  # the 45-token prompt went in 8-token chunks beside the decoding one
    # Both prompts arrive together: they share the 8-token budget (+1 token per decoding slot).
    assert max(sum(n for _, n in step) for step in backend.fed) <= 8 + 2
    # A step runs the chunks' call, then the decoding streams' one-token call right after it.
    steps = backend.fed
    beside = [a for a, b in itertools.pairwise(steps) if max(n for _, n in a) > 1 and b[0][1] == 1]
    assert len(beside) >= 6
    # control: alone (nobody decoding) a prompt goes in whole
    alone_sched = Scheduler(CountingSteps(gen.backend), Metrics(), prefill_chunk=8)
    alone_sched.start()
    try:
        _run(alone_sched, [prompts[1]], stagger=False)
    finally:
        alone_sched.stop()
    assert alone_sched.backend.fed[2] == [(0, 45)]  # fed[0:2] are the warm-up steps


def test_prefill_budget_follows_the_measured_cost(tiny_static):
    """With a stall target the budget is what fits it at the measured cost per position."""
    gen = load(tiny_static, slots=2, device="cpu", threads=1, tokenizer=False)
    tight = Scheduler(gen.backend, Metrics(), prefill_chunk=0, prefill_stall_s=1e-9)
    loose = Scheduler(gen.backend, Metrics(), prefill_chunk=0, prefill_stall_s=1e9)
    fixed = Scheduler(gen.backend, Metrics(), prefill_chunk=24)
    m = gen.backend.max_context
    assert tight.prefill_budget() == loose.prefill_budget() == m  # nothing measured yet
    for sched in (tight, loose, fixed):
        sched.start()
        try:
            _run(sched, [[5 + t for t in range(40)]], stagger=False)
        finally:
            sched.stop()
    assert tight.prefill_budget() == 16  # 1 ns fits no token: the floor
    assert loose.prefill_budget() == m  # 1000 s fits any prompt: the cap
    assert fixed.prefill_budget() == 24  # control: no stall target, the fixed chunk


def test_only_the_first_prompt_of_a_step_is_cut_to_the_budget(tiny_static):
    """A later prompt goes in whole or waits: a head cut off to fill the budget is a narrow call."""
    gen = load(tiny_static, slots=4, device="cpu", threads=1, tokenizer=False)
    sched = Scheduler(gen.backend, Metrics(), prefill_chunk=16)

    def job(slot: int, prompt: list[int], fed: int = 0) -> Job:
        j = Job(Sequence(slot, prompt, SamplingParams(max_new_tokens=4), ()), lambda _: None)
        j.slot, j.fed = slot, fed
        if fed == len(prompt):
            j.next_feed = SlotFeed(slot, [prompt[-1]])
        return j

    decoding = job(0, [1, 2, 3], fed=3)
    first, second, small = job(1, list(range(5, 15))), job(2, list(range(5, 15))), job(3, [9, 9])
    fed = {j.slot: len(f.tokens) for j, f in sched._plan([decoding, first, second, small])}
    # 16 tokens: the first prompt whole (10), the second (10 > 6 left) waits, the third fits (2)
    assert fed == {0: 1, 1: 10, 3: 2}
    # control: the step's first prompt is cut to the budget when it is longer
    long, small = job(1, list(range(5, 45))), job(3, [9, 9])
    fed = {j.slot: len(f.tokens) for j, f in sched._plan([decoding, long, small])}
    assert fed == {0: 1, 1: 16}
