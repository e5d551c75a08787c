"""Continuous batching over the static-KV slots: one engine thread, one slot step at a time.

Every step feeds each slot that holds a sequence: a decoding sequence its last token, a new one
(the next chunk of) its prompt, with `restart` on its first chunk. A waiting request takes a free
slot at the next step, so its prefill runs in the same `step` as the others' decode; a finished
or cancelled sequence frees its slot at once and the others never wait for it.

The static graph takes right-padded rows: one call over a prefill of P tokens runs S=P for each
row it binds, so a step runs the prompt chunks as one call and the one-token feeds as a second
(merged, each decoding row would compute P positions). The chunks' call runs first and its
first tokens go out before the decode call: a newcomer's time to first token does not include
it. The running streams' next token waits for the prefill's work; a budget bounds that wait:
while a stream decodes, all prompts together feed at most `prefill_budget()` tokens per step
(a long prompt is fed over several steps, sampling only after its last chunk). The budget is
`prefill_chunk`, or with `prefill_stall_s` what fits that time at the measured cost per prefill
position (the server's default). When no stream is decoding, prompts go in whole.
With `ttft_target_s` (`kiln serve --adaptive`) runtime/server/adaptive.py's `decide` moves that
same budget and a cap on the slots admitted, every `ADAPT_EVERY` steps, from the queue and the
recent times to first token; neither changes what a request computes, only when it is fed.

Per-request state (sampling with its seed, stop tokens and strings, incremental detokenization)
is runtime/decode.py's `Sequence`, and the per-slot phases are that module's too (`SlotTable`
holds who has which slot, `choose_all` picks the step's tokens, `follow` makes the `Event` and
picks the next feed); this module only decides which jobs run and how much of each prompt is
fed.
The graph call blocks, so the loop runs in its own thread; results reach asyncio through the
`emit` callback each job carries (the server wraps `loop.call_soon_threadsafe`).

Letters in names: N slots fed this step, V vocab.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

import numpy as np
from prometheus_client import Counter

from kiln.errors import KilnError, RequestError
from kiln.runtime.decode import Event, Sequence, SlotTable, choose_all, follow
from kiln.runtime.prefix_cache import PrefixCache, PrefixStats
from kiln.runtime.server.adaptive import LoadState, Policy, Settings, decide
from kiln.runtime.server.metrics import Metrics
from kiln.runtime.slots import RewindableSlots, SlotBackend, SlotFeed
from kiln.runtime.speculate import SpecStats, Speculator

log = logging.getLogger(__name__)

_Stats = TypeVar("_Stats", PrefixStats, SpecStats)
ADAPT_EVERY = 8  # steps between two adaptive decisions
PREFILL_STALL_S = 0.2  # default time a step's prompt chunks may stall decoding streams


def _count_since(now: _Stats, seen: _Stats, **counters: Counter) -> _Stats:
    """Add each stats field's growth since `seen` to its counter; the snapshot to keep."""
    for name, counter in counters.items():
        counter.inc(getattr(now, name) - getattr(seen, name))
    return dataclasses.replace(now)


@dataclass(eq=False)
class Job:
    """One request inside the scheduler: its Sequence, where results go, where it stands."""

    seq: Sequence
    emit: Callable[[Event | BaseException], None]
    cancelled: bool = False
    slot: int | None = None
    fed: int = 0  # prompt tokens fed so far (a long prompt is fed over several steps)
    next_feed: SlotFeed | None = None  # once the prompt is in: what `follow` chose
    submitted_s: float = field(default_factory=time.perf_counter)
    last_token_s: float | None = None


class Scheduler:
    """Owns the slot backend: admits waiting jobs into free slots and runs the step loop.

    At most `slots + max_queue` jobs are in at once; one more is refused with 429 (never queued
    without bound, never left hanging).
    """

    def __init__(
        self,
        backend: SlotBackend,
        metrics: Metrics,
        *,
        max_queue: int = 64,
        prefill_chunk: int = 64,
        prefill_stall_s: float | None = None,
        retry_after_s: int = 1,
        reprefill_at: int | None = None,
        prefix_cache: PrefixCache | None = None,
        speculator: Speculator | None = None,
        ttft_target_s: float | None = None,
    ) -> None:
        if (prefix_cache or speculator) and reprefill_at is not None:
            raise KilnError(
                "Prefix reuse and speculative decoding cannot run with a cache rebuild "
                "(longrope's reprefill_at); serve this artifact without them."
            )
        self.prefix_cache = prefix_cache  # runtime/prefix_cache.py
        self.speculator = speculator  # runtime/speculate.py
        self.backend = backend
        self.metrics = metrics
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk if prefill_chunk > 0 else backend.max_context
        self.prefill_stall_s = prefill_stall_s  # None: every chunk is prefill_chunk
        self._position_s: float | None = None  # measured seconds per prefill position (EWMA)
        self.retry_after_s = retry_after_s
        self.active_cap = backend.slots  # slots admitted at once (adaptive lowers it at start)
        self._policy: Policy | None = None  # set with ttft_target_s: adaptive
        self._adaptive_chunk: int | None = None  # the budget adaptive chose (first: measured)
        self._ttft: collections.deque[float] = collections.deque(maxlen=64)
        self._next_decision = 0  # the step count at which adaptive decides next
        if ttft_target_s is not None:
            chunk = self.prefill_chunk  # adaptive's budget stays within [16, prefill_chunk]
            self._policy = Policy(
                ttft_target_s, slots=backend.slots, max_chunk=chunk, min_chunk=min(16, chunk)
            )
            self.active_cap = max(1, backend.slots // 2)  # the first queued burst doubles it
            metrics.active_cap.set(self.active_cap)
        self._seen_prefix = PrefixStats()  # the caches' stats already counted in metrics
        self._seen_spec = SpecStats()
        self.reprefill_at = reprefill_at  # longrope's cache rebuild (runtime/artifact.py)
        self.steps = 0
        self._waiting: collections.deque[Job] = collections.deque()
        self._slots: SlotTable[Job] = SlotTable(backend)
        self._cv = threading.Condition()
        self._closing = False  # no new jobs
        self._abort = False  # fail what is left and exit the loop
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)

    # -- called from the server (any thread) --------------------------------------------------

    def start(self) -> None:
        """Warm the graph up (a short prefill and a decode step on slot 0) and start the thread."""
        t0 = time.perf_counter()
        n = max(1, min(8, self.backend.max_context - 2))
        self.backend.step([SlotFeed(0, [0] * n, restart=True)])
        self.backend.step([SlotFeed(0, [0])])
        self.backend.release(0)
        log.info("warm-up step in %.2f s; engine thread started", time.perf_counter() - t0)
        self._thread.start()

    def submit(self, *jobs: Job) -> None:
        """Queue jobs (a request's n choices, all or none), or raise RequestError 429/503.

        429: the queue is full; 503: the server is shutting down.
        """
        with self._cv:
            if self._closing:
                raise RequestError(
                    "The server is shutting down and takes no new requests; retry against "
                    "another replica or after it restarts.",
                    status=503,
                    code="shutting_down",
                )
            held = len(self._waiting) + len(self._slots.held)
            if held + len(jobs) > self.backend.slots + self.max_queue:
                raise RequestError(
                    f"Server busy: all {self.backend.slots} slots are taken and "
                    f"{len(self._waiting)} requests wait (queue limit {self.max_queue}); retry "
                    f"after {self.retry_after_s} s or lower your concurrency.",
                    status=429,
                    code="queue_full",
                )
            self._waiting.extend(jobs)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away); its slot is freed before the next step."""
        with self._cv:
            job.cancelled = True
            self._cv.notify()

    @property
    def idle(self) -> bool:
        """True when no job waits or runs."""
        with self._cv:
            return not self._waiting and not self._slots.held

    def engine_load(self) -> dict[str, float]:
        """Free slots, waiting jobs and the oldest one's wait: what a router or autoscaler reads."""
        with self._cv:
            oldest = self._waiting[0].submitted_s if self._waiting else None
            return {
                "free_slots": float(self._slots.free),
                "queued": float(len(self._waiting)),
                "oldest_wait_s": 0.0 if oldest is None else time.perf_counter() - oldest,
                "running": float(self._thread.is_alive()),
            }

    def close(self) -> None:
        """Refuse new jobs from now on (jobs already in finish normally)."""
        with self._cv:
            self._closing = True

    def stop(self, timeout_s: float = 0.0) -> None:
        """Close, let running jobs finish for up to `timeout_s`, fail the rest, end the thread."""
        self.close()
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cv:
            self._abort = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # -- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                t_wait = time.perf_counter()
                while not self._abort and not self._waiting and not self._slots.held:
                    self._cv.wait()
                self.metrics.engine_seconds.labels("idle").inc(time.perf_counter() - t_wait)
                if self._abort:
                    self._fail_all(
                        RequestError(
                            "The server shut down before this request finished; retry it.",
                            status=503,
                            code="shutting_down",
                        )
                    )
                    return
                self._drop_cancelled()
                if self._policy is not None and self.steps >= self._next_decision:
                    self._next_decision = self.steps + ADAPT_EVERY
                    self._adapt(self._policy)
                self._admit()
                batch = list(self._slots.held.values())
            if batch:
                self._step(batch)

    def _admit(self) -> None:
        """Give free slots to waiting jobs, first come first served (lock held)."""
        while self._slots.free and self._waiting and len(self._slots.held) < self.active_cap:
            job = self._waiting.popleft()
            if job.cancelled:
                self.metrics.finished.labels("cancelled").inc()
                continue
            if self.prefix_cache is None:
                job.slot = self._slots.take(job)
            else:  # continue in a kept slot that holds the prompt's start: feed only the rest
                feed = self.prefix_cache.claim(job.seq.prompt_ids, self._slots.free_slots)
                job.slot = self._slots.take(job, feed.slot)
                job.fed = len(job.seq.prompt_ids) - len(feed.tokens)
        self._count_reuse()
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.active.set(len(self._slots.held))

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._slots.held.values() if j.cancelled]:
            self._release(job, "cancelled")
        kept = [j for j in self._waiting if not j.cancelled]
        for _ in range(len(self._waiting) - len(kept)):
            self.metrics.finished.labels("cancelled").inc()
        self._waiting = collections.deque(kept)

    def _release(self, job: Job, reason: str) -> None:
        """Free a job's slot (lock held, or engine thread with the job no longer fed)."""
        assert job.slot is not None
        if self.prefix_cache is not None and reason != "error":
            self.prefix_cache.keep(job.slot, job.seq.tokens)  # its rows hold what was fed
            self._slots.release(job.slot, keep=True)
        else:
            if self.prefix_cache is not None:
                self.prefix_cache.forget(job.slot)
            self._slots.release(job.slot)
        job.slot = None
        self.metrics.finished.labels(reason).inc()
        self.metrics.active.set(len(self._slots.held))

    def prefill_budget(self) -> int:
        """Prompt tokens all prefilling jobs may feed this step while some stream decodes.

        Fixed (`prefill_chunk`) unless `prefill_stall_s` is set: then the tokens the last
        prefill calls' measured cost per position says fit in that time, between 16 and
        `prefill_chunk` (a GPU takes whole prompts, a busy CPU smaller chunks). Adaptive
        starts from that value and moves it (`_adapt`).
        """
        if self._adaptive_chunk is not None:
            return self._adaptive_chunk
        if self.prefill_stall_s is None or self._position_s is None:
            return self.prefill_chunk
        fit = int(self.prefill_stall_s / self._position_s)
        return max(min(16, self.prefill_chunk), min(self.prefill_chunk, fit))

    def _adapt(self, policy: Policy) -> None:
        """One adaptive decision (lock held): the budget and active cap for the next steps."""
        current = Settings(self.prefill_budget(), self.active_cap)
        state = LoadState(len(self._waiting), len(self._slots.held), list(self._ttft))
        self._ttft.clear()  # the next decision reads only what happens after this one
        d = decide(state, current, policy)
        m = self.metrics
        if self._adaptive_chunk is None:  # from now on the budget is adaptive's
            self._adaptive_chunk = current.prefill_chunk
            m.prefill_budget.set(current.prefill_chunk)
        if not d.changed:
            m.adaptive_decisions.labels("keep").inc()
            return
        more = d.settings.active_slots > current.active_slots or (
            d.settings.prefill_chunk > current.prefill_chunk
        )  # the rule for slow first tokens only grows, the one for fast ones only shrinks
        m.adaptive_decisions.labels("slow_first_tokens" if more else "fast_first_tokens").inc()
        self._adaptive_chunk = d.settings.prefill_chunk
        self.active_cap = d.settings.active_slots
        m.prefill_budget.set(self._adaptive_chunk)
        m.active_cap.set(self.active_cap)
        log.info("adaptive: %s", d.reason)

    def _count_reuse(self) -> None:
        """Add what the prefix cache and the speculator did since the last call to metrics."""
        m = self.metrics
        if self.prefix_cache is not None:
            self._seen_prefix = _count_since(
                self.prefix_cache.stats,
                self._seen_prefix,
                lookups=m.prefix_lookups,
                hits=m.prefix_hits,
                tokens_saved=m.prefix_tokens_saved,
            )
        if self.speculator is not None:
            self._seen_spec = _count_since(
                self.speculator.stats,
                self._seen_spec,
                passes=m.spec_passes,
                drafted=m.spec_drafted,
                accepted=m.spec_accepted,
            )

    def _plan(self, batch: list[Job]) -> list[tuple[Job, SlotFeed]]:
        """This step's feeds: each decoding job its last token, prefilling jobs prompt chunks.

        While some job decodes, prompts share a budget of `prefill_budget()` tokens per step,
        in admission order (a job left out this step waits for the next): the running streams'
        stall stays bounded however many requests arrive at once. Only the step's first prompt
        is cut to the budget; a later one goes in whole or waits, since a short head cut off
        to fill the budget is its own narrow call that reads every weight for a few tokens
        (on the 2-core host a 128-token prompt then took two calls and ~20% more time per
        prompt token). With nobody decoding, each prompt goes in whole.
        """
        decoding = any(job.fed >= len(job.seq.prompt_ids) for job in batch)
        budget = self.prefill_budget() if decoding else sum(len(j.seq.prompt_ids) for j in batch)
        plan: list[tuple[Job, SlotFeed]] = []
        chunked = False  # a prompt chunk is in this step's plan
        for job in batch:
            prompt = job.seq.prompt_ids
            assert job.slot is not None
            if job.fed >= len(prompt):
                assert job.next_feed is not None  # set by _accept after the last chunk
                plan.append((job, job.next_feed))
                continue
            if budget <= 0 or (chunked and len(prompt) - job.fed > budget):
                continue
            chunked = True
            chunk = prompt[job.fed : job.fed + budget]
            plan.append((job, SlotFeed(job.slot, chunk, restart=job.fed == 0)))
            job.fed += len(chunk)
            budget -= len(chunk)
            self.metrics.prompt_tokens.inc(len(chunk))
        return plan

    def _step(self, batch: list[Job]) -> None:
        """One slot step: the prompt chunks' call first, their first tokens out, then decode.

        A newcomer's first token leaves before the decoding streams' call runs (its time to
        first token does not include that call); the calls are the ones a single `step` over
        all feeds would run (runtime/slots.py plan_calls splits wide from one-token feeds).
        """
        t_plan = time.perf_counter()
        # slots already decoding (before `_plan` feeds a prompt's last chunk): only they draft
        decoding = {j.slot for j in batch if j.fed >= len(j.seq.prompt_ids) and j.slot is not None}
        plan = self._plan(batch)
        self.metrics.engine_seconds.labels("plan").inc(time.perf_counter() - t_plan)
        wide = [(job, f) for job, f in plan if f.restart or len(f.tokens) > 1]
        narrow = [(job, f) for job, f in plan if not (f.restart or len(f.tokens) > 1)]
        for part in (wide, narrow):
            if part:
                self._run(part, decoding)
        self.steps += 1

    def _run(self, plan: list[tuple[Job, SlotFeed]], decoding: set[int]) -> None:
        """Run feeds in one backend step, then sample, emit and free finished slots.

        Each phase's wall time goes to `kiln_engine_seconds{phase}` (runtime/server/README.md
        reads the split): the graph calls by kind, the host work around them, choosing,
        accepting (detokenize, stop rules) and the hand-off to the event loop.
        """
        m = self.metrics
        batch = [job for job, _ in plan]
        feeds = [feed for _, feed in plan]
        t0 = time.perf_counter()
        try:
            if self.speculator is None:
                logits_NV: list[np.ndarray] | np.ndarray = self.backend.step(feeds)
            else:
                rewind = cast("RewindableSlots", self.backend)
                held = {j.slot: j.seq for j in batch if j.slot is not None}
                # only this call's decoding slots draft (the step's other call has the rest)
                feeds, tails = self.speculator.draft(rewind, feeds, held, decoding & held.keys())
                logits_NV = rewind.step_tails(feeds, tails)
        except Exception as e:  # the requests fail, the server keeps serving
            if not isinstance(e, KilnError):
                log.exception("graph step failed (%d slots fed)", len(feeds))
            with self._cv:
                for job in batch:
                    job.emit(e)
                    self._release(job, "error")
            return
        now = time.perf_counter()
        m.step_time.observe(now - t0)
        m.batch_size.observe(len(feeds))
        in_calls = 0.0
        for call in getattr(self.backend, "last_calls", ()):
            m.engine_seconds.labels(f"graph_{call.kind}").inc(call.seconds)
            m.graph_calls.labels(call.kind).inc()
            m.graph_positions.labels(call.kind).inc(call.rows * call.width)
            in_calls += call.seconds
            if call.kind == "prefill":
                cost = call.seconds / (call.rows * call.width)
                old = self._position_s
                self._position_s = cost if old is None else 0.7 * old + 0.3 * cost
        m.engine_seconds.labels("graph_host").inc(max(0.0, now - t0 - in_calls))
        rows = [
            n
            for n, job in enumerate(batch)
            if job.fed >= len(job.seq.prompt_ids) and not job.cancelled
        ]  # a prompt chunk that is not the last: nothing to sample yet
        jobs = [batch[n] for n in rows]
        try:
            if self.speculator is None:
                tokens = choose_all([job.seq for job in jobs], np.asarray(logits_NV)[rows])
            else:  # each row accepts along its drafts (`_verify`)
                tokens = [-1] * len(jobs)
        except Exception:  # a bug in a sampler: find the row it belongs to, row by row
            log.exception("batched choice failed; choosing row by row")
            tokens = [-1] * len(jobs)
        t_chosen = time.perf_counter()
        m.engine_seconds.labels("sample").inc(t_chosen - now)
        done, failed, events = [], [], []
        for job, token, n in zip(jobs, tokens, rows, strict=True):
            try:
                if self.speculator is not None:
                    events += self._verify(job, feeds[n], np.asarray(logits_NV[n]), now)
                    if job.seq.done:
                        done.append(job)
                    continue
                if token < 0:
                    token = job.seq.choose(logits_NV[n])
                events.append((job, self._accept(job, token, now)))
            except Exception as e:  # a bug in sampling or detokenization: fail this request only
                log.exception("sampling failed in slot %s", job.slot)
                job.emit(e)
                failed.append(job)
                continue
            if job.seq.done:
                done.append(job)
        t_accepted = time.perf_counter()
        m.engine_seconds.labels("accept").inc(t_accepted - t_chosen)
        for job, event in events:
            job.emit(event)
        m.engine_seconds.labels("emit").inc(time.perf_counter() - t_accepted)
        self._count_reuse()
        if done or failed:
            with self._cv:
                for job in done:
                    self._release(job, job.seq.finish_reason or "stop")
                for job in failed:
                    self._release(job, "error")

    def _accept(self, job: Job, token: int, now: float) -> Event:
        """Record the job's chosen token (text, stop rules, next feed) and its latency."""
        assert job.slot is not None
        event, job.next_feed = follow(
            self.backend, job.slot, job.seq, token, reprefill_at=self.reprefill_at
        )
        self._observe(job, now)
        return event

    def _verify(
        self, job: Job, feed: SlotFeed, logits_SV: np.ndarray, now: float
    ) -> list[tuple[Job, Event]]:
        """Accept along the fed drafts (runtime/speculate.py): every token chosen this step."""
        assert self.speculator is not None
        rewind = cast("RewindableSlots", self.backend)
        events, job.next_feed = self.speculator.verify(rewind, feed, job.seq, logits_SV)
        for _ in events:
            self._observe(job, now)
        return [(job, event) for event in events]

    def _observe(self, job: Job, now: float) -> None:
        """A token of the job went out: its time to first token or since its last token."""
        if job.last_token_s is None:
            self.metrics.ttft.observe(now - job.submitted_s)
            self._ttft.append(now - job.submitted_s)
        else:
            self.metrics.token_latency.observe(now - job.last_token_s)
        job.last_token_s = now
        self.metrics.generated.inc()

    def _fail_all(self, error: BaseException) -> None:
        for job in [*self._waiting, *self._slots.held.values()]:
            if not job.cancelled:
                job.emit(error)
        for job in list(self._slots.held.values()):
            self._release(job, "error")
        self._waiting.clear()
        self.metrics.queue_depth.set(0)
