"""The continuous-batching scheduler.

One thread owns the execution backend (the asyncio server never blocks on
llama.cpp). Each step it:

1. takes new requests and cancellations from the intake queue, expires queued
   requests past their timeout (a failure the API answers with 503), cancels requests
   whose client went away;
2. admits queued requests while sequences are free (``max_running``), asking
   the prefix cache for a sequence that already holds as much of the prompt as
   can be reused. A request that resumes a session stored below the hot tier has
   its state decoded off this thread first (``PrefixCache.prepare``, at most
   ``PREPARE_AHEAD`` at a time); it is admitted once that is ready, and requests
   behind it are not held up meanwhile;
3. builds one batch of at most ``step_tokens``: the next token of every decoding
   sequence, then chunks of pending prefills (at most ``prefill_chunk`` tokens
   each), so decoding sequences are never starved by a long prompt. Prefills go
   shortest remaining first (``prefill_order``): a prompt whose prefix was cached
   gets its first token without waiting behind long uncached prompts; a prefill
   older than ``prefill_aging_s`` goes ahead of younger ones (oldest first), so a
   long prompt is never starved by a stream of short ones (``fair``: the oldest
   prefill gets the first chunk of every step, the rest goes shortest first);
   at most ``prefill_seqs`` sequences prefill in one step. With a KV stream per
   sequence llama.cpp runs only sequences of consecutive ids, equally many tokens
   each, in one pass of the model (``ExecutionBackend.micro_batches``): with
   ``microbatch_tokens`` (on a GPU) the chunks of consecutive streams are cut to one
   length, and a small chunk that would be a pass of its own waits a step, where
   the passes saved are worth more than the tokens put off.
   A family prefix is computed once: requests of a family whose snapshot does
   not exist yet wait for the one furthest along, then load its snapshot;
4. makes room for the batch's cells (evicting idle sessions, then preempting
   the newest request, which is resumed later from its own cached state);
5. decodes, samples each sequence with its own sampler chain, streams text.

Every request ends with exactly one :class:`~kv3d_core.engine.events.Done` or
:class:`~kv3d_core.engine.events.Failed` event (``engine/events.py``). Two per-job hooks serve
OpenAI's ``n`` and ``logprobs``: a job with ``forks`` (the other choices of one prompt) is
prefilled once; when its prompt is done each fork gets a sequence sharing the prompt's
cells (``seq_cp``, no copy) and samples its first token from the same logits with its own
sampler, then decodes on its own. A job with ``logprobs`` sends the log-probability of
each token with the text it produced: ``Token(text, [TokenLogprob, ...])``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kv3d_core.contracts.backend import BatchEntry, ExecutionBackend, Sampler, SamplingParams, TokenLogprob
from kv3d_core.contracts.detector import FamilyKey, PromptView
from kv3d_core.contracts.session import SessionState, check_transition
from kv3d_core.engine.events import Done, Event, Failed, FailureKind, Sink, Token
from kv3d_core.engine.textstream import TextStream
from kv3d_core.errors import BackendError, KVCacheFullError
from kv3d_core.metrics import Metrics
from kv3d_core.prefix.cache import PrefixCache
from kv3d_core.prefix.radix import common_prefix_len
from kv3d_core.tiers.entry import CacheEntry

log = logging.getLogger("kv3d.scheduler")

GAUGE_INTERVAL_S = 0.5
PREPARE_AHEAD = 8          # restores being decoded off the scheduler thread at once (each holds a blob)


def _cancelled(job: "Job") -> bool:
    return job.cancelled or (job.parent is not None and job.parent.cancelled)


def _emit_to(sink: Sink, event: Event) -> None:
    try:
        sink(event)
    except Exception:  # a closed client must not break the scheduler
        pass


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after = retry_after


@dataclass
class SchedulerConfig:
    max_running: int = 32
    max_waiting: int = 256
    queue_timeout_s: float = 60.0
    prefill_chunk: int = 256
    retry_after_s: int = 2
    step_tokens: int | None = None     # None: the backend's batch size
    prefill_order: str = "shortest"    # or "fifo", or "fair" (the oldest first, then shortest)
    prefill_aging_s: float = 30.0
    prefill_seqs: int | None = None    # most sequences one step prefills (None: as many as fit)
    implicit_families: bool = False    # raw prompts prefilling together share their common prefix
    microbatch_tokens: int | None = None   # prompt tokens a micro-batch is worth (None: 128 on a GPU, 0 = off)
    finish_first: bool = False         # a step that ends a prompt carries no unfinished chunk of another
    admit_budget_ms: float | None = None   # an admission pass stops after the first request admitted past this


@dataclass(eq=False)
class Job:
    """One request inside the scheduler."""

    id: str
    prompt: PromptView
    family: FamilyKey
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    sink: Sink
    context: list[int] = field(default_factory=list)   # prompt + generated; KV holds context[:n_past]
    state: SessionState = SessionState.QUEUED
    seq: int | None = None
    n_past: int = 0
    n_cached: int = 0
    cache_source: str = "miss"
    snapshot: CacheEntry | None = None
    sampler: Sampler | None = None
    stream: TextStream | None = None
    generated: int = 0
    t_submit: float = field(default_factory=time.monotonic)
    t_admit: float | None = None      # first admission (a sequence was leased)
    t_first: float | None = None
    cancelled: bool = False
    preemptions: int = 0
    keep_cache: bool = True
    logprobs: int | None = None       # record each token's logprob and this many alternatives
    forks: list[tuple[SamplingParams, Sink]] = field(default_factory=list)   # choices sharing this prefill
    parent: "Job | None" = None       # the job a fork was made from (its cancellation is the fork's)
    lp_pending: list[tuple[int, TokenLogprob]] = field(default_factory=list)  # (first byte, logprob) unsent
    n_bytes: int = 0                  # bytes of generated text so far
    prep: Any = None                  # PrefixCache.prepare's handle: its restore, decoded ahead
    prep_asked: bool = False

    @property
    def n_prompt(self) -> int:
        return len(self.prompt.tokens)

    def move(self, new: SessionState) -> None:
        self.state = check_transition(self.state, new)


class JobHandle:
    """What the API holds: cancel a request from any thread."""

    def __init__(self, job: Job, scheduler: "Scheduler") -> None:
        self._job = job
        self._scheduler = scheduler

    @property
    def id(self) -> str:
        return self._job.id

    def cancel(self) -> None:
        """Cancel the request, and every choice forked from it (they check their parent)."""
        if not self._job.cancelled:
            self._job.cancelled = True
            self._scheduler.wake()


class Scheduler:
    def __init__(self, backend: ExecutionBackend, cache: PrefixCache, metrics: Metrics,
                 config: SchedulerConfig | None = None) -> None:
        self.backend = backend
        self.cache = cache
        self.metrics = metrics
        self.cfg = config or SchedulerConfig()
        self.cfg.max_running = max(1, min(self.cfg.max_running, backend.info.n_seq_max))
        self._intake: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_batch_seqs_seen = 0
        # seconds, since start: llama_decode, sampling, admission (restores and prefix copies
        # into sequences included), and the rest of the scheduler's work
        self.step_split = {"decode": 0.0, "sample": 0.0, "admit": 0.0, "other": 0.0}
        self.admit_max_s = 0.0             # the longest one admission pass held the thread, since start
        # where first tokens' time goes, since start: queued (no sequence yet) and admitted (prefill,
        # loads, waiting for a shared prefix), summed over ``n`` first tokens; ``parked``: prefill
        # steps a request sat out while another computed the prefix it will load
        self.ttft_split = {"queued": 0.0, "admitted": 0.0, "n": 0, "parked": 0}
        # per-step hot path: metric children and constants looked up once
        self._generated = metrics.generated_tokens
        self._split_metric = {p: metrics.step_seconds.labels(p) for p in self.step_split}
        self._kind_steps = {k: metrics.llama_steps.labels(k) for k in ("prefill", "decode")}
        self._kind_seconds = {k: metrics.llama_step_seconds.labels(k) for k in ("prefill", "decode")}
        self._prefill_tokens = metrics.prefill_tokens
        self._n_ctx_seq = backend.info.n_ctx_seq
        self._gauges_at = 0.0
        mb = self.cfg.microbatch_tokens
        self._microbatch_tokens = int(mb) if mb is not None else (128 if backend.info.gpu_layers != 0 else 0)
        # micro-batches (passes of the model) the steps ran, and prompt tokens their plans put off
        # to later steps to run fewer (:meth:`_fewer_microbatches`), since start
        self.microbatch_plans = {"passes": 0, "trimmed_tokens": 0}
        self.finish_first_deferred = 0     # chunks ``finish_first`` moved to a later step, since start
        self._microbatches = metrics.step_microbatches

    # -- public, any thread -------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kv3d-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def submit(self, job: Job) -> JobHandle:
        with self._cond:
            if len(self._intake) + len(self._waiting) >= self.cfg.max_waiting + max(0, self.cfg.max_running - len(self._running)):
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(self.cfg.retry_after_s)
            job.context = list(job.prompt.tokens)
            self._intake.append(job)
            self._cond.notify_all()
        self.metrics.prompt_tokens.inc(job.n_prompt)
        return JobHandle(job, self)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the scheduler thread between steps (inspection, admin)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def load(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting) + len(self._intake)}

    # -- scheduler thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while (not self._stop and not self._intake and not self._calls and not self._running
                       and not self._waiting):
                    self._cond.wait(0.5)
                if self._stop:
                    break
                new = list(self._intake)
                self._intake.clear()
                calls = list(self._calls)
                self._calls.clear()
            self._waiting.extend(new)
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # delivered to the caller
                        fut.set_exception(exc)
            t_step = time.perf_counter()
            before = self.step_split["decode"] + self.step_split["sample"] + self.step_split["admit"]
            steps_before = self.steps
            try:
                self._step()
            except Exception:  # never let the thread die: fail what was running, go on
                log.exception("scheduler step failed")
                for job in list(self._running):
                    self._fail(job, FailureKind.INTERNAL, "internal error in the scheduler")
            if self.steps > steps_before:       # a step ran: what it spent outside decode and sampling
                other = time.perf_counter() - t_step - (self.step_split["decode"] + self.step_split["sample"]
                                                        + self.step_split["admit"] - before)
                self.step_split["other"] += other
                self._split_metric["other"].inc(max(0.0, other))
            self.metrics.running.set(len(self._running))    # also after the last request: the
            self.metrics.waiting.set(len(self._waiting) + len(self._intake))   # gauges must not stay stale
            if self._waiting and not self._running:
                with self._cond:   # nothing runnable (waiting for capacity): don't spin
                    if not self._intake and not self._calls:
                        self._cond.wait(0.05)
        for job in list(self._running) + list(self._waiting) + list(self._intake):
            self._emit_all(job, Failed(FailureKind.SHUTTING_DOWN, "the server is shutting down"))
            self._release(job, keep=False)

    def _emit(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # a closed client must not break the scheduler
            job.cancelled = True

    def _emit_all(self, job: Job, event: Event) -> None:
        """An ending event for ``job`` and for the choices still waiting to fork from it."""
        self._emit(job, event)
        for _, sink in job.forks:
            _emit_to(sink, event)
        job.forks = []

    def _release(self, job: Job, keep: bool, *, close_sampler: bool = True) -> None:
        if job.sampler is not None and close_sampler:
            job.sampler.close()
            job.sampler = None
        if job.seq is not None:
            self.cache.release(job.seq, job.context, job.n_past, job.family, job.snapshot,
                               keep=keep and job.keep_cache, n_prompt=job.n_prompt)
            job.seq = None
            job.snapshot = None
        if job in self._running:
            self._running.remove(job)

    def _fail(self, job: Job, kind: FailureKind, message: str, retry_after: int | None = None) -> None:
        self._emit_all(job, Failed(kind, message, retry_after))
        self._release(job, keep=False)
        if job.state is not SessionState.DROPPED:
            job.state = SessionState.DROPPED

    def _finish(self, job: Job, reason: str) -> None:
        tail = job.stream.flush() if job.stream else ""
        if tail or job.lp_pending:
            self._emit_text(job, tail)
        usage = {"prompt_tokens": job.n_prompt, "completion_tokens": job.generated,
                 "total_tokens": job.n_prompt + job.generated, "cached_tokens": job.n_cached}
        self._emit(job, Done(reason, usage))
        job.move(SessionState.IDLE)
        self._release(job, keep=True)

    def _step(self) -> None:
        now = time.monotonic()
        # cancellations and timeouts
        for job in [j for j in self._waiting if _cancelled(j)]:
            self._waiting.remove(job)
            job.state = SessionState.DROPPED
            self._release(job, keep=False)
        for job in [j for j in self._running if _cancelled(j)]:
            job.state = SessionState.DROPPED
            self._release(job, keep=False)
        while self._waiting and now - self._waiting[0].t_submit > self.cfg.queue_timeout_s:
            job = self._waiting.popleft()
            self.metrics.rejected.labels("queue_timeout").inc()
            self._emit_all(job, Failed(FailureKind.QUEUE_TIMEOUT,
                                       f"no sequence became free within {self.cfg.queue_timeout_s:g} s; retry later",
                                       self.cfg.retry_after_s))
            self._release(job, keep=False)
            job.state = SessionState.DROPPED
        t_admit = time.perf_counter()
        self._admit()
        dt = time.perf_counter() - t_admit
        self.step_split["admit"] += dt
        self._split_metric["admit"].inc(dt)
        self.admit_max_s = max(self.admit_max_s, dt)
        self.metrics.running.set(len(self._running))
        self.metrics.waiting.set(len(self._waiting) + len(self._intake))
        if now - self._gauges_at > GAUGE_INTERVAL_S or not self._running:
            self._gauges_at = now
            self.cache.update_gauges()          # walks every cache entry: not every step
        if not self._running:
            return
        self.cache.trim_idle(now)               # idle hot cells slow this step: spill the stale ones
        self._decode_step()

    def _admit(self) -> None:
        if self._waiting and len(self._running) < self.cfg.max_running:
            self._prepare_ahead()
        budget = self.cfg.admit_budget_ms
        t0, admitted_now = time.perf_counter(), 0
        i = 0
        while i < len(self._waiting) and len(self._running) < self.cfg.max_running:
            if budget is not None and admitted_now and (time.perf_counter() - t0) * 1e3 >= budget:
                break                  # the rest at the next step: running sequences go on meanwhile
            job = self._waiting[i]
            if job.prep is not None and not job.prep.done():
                i += 1                 # its restore is still being decoded: the next request goes first
                continue
            try:
                admitted = self._admit_one(job)
            except Exception as exc:   # a failure here concerns this request only
                log.exception("admission of request %s failed", job.id)
                if job in self._waiting:
                    self._waiting.remove(job)
                job.prep = None
                self._fail(job, FailureKind.INTERNAL, f"internal error while starting the request: {exc}")
                continue
            if not admitted:
                break
            admitted_now += 1

    def _prepare_ahead(self) -> None:
        """Start decoding the stored sessions the next requests to admit resume (off this
        thread), as many at once as ``PREPARE_AHEAD``, among as many requests as could be
        admitted now and the few after them."""
        busy = sum(1 for j in self._waiting if j.prep is not None and not j.prep.done())
        room = self.cfg.max_running - len(self._running) + PREPARE_AHEAD
        for job in list(itertools.islice(self._waiting, room)):
            if busy >= PREPARE_AHEAD:
                return
            if job.prep_asked or _cancelled(job):
                continue
            job.prep_asked = True
            try:
                job.prep = self.cache.prepare(dataclasses.replace(job.prompt, tokens=job.context), job.family)
            except Exception:          # preparing is an optimisation: admission restores itself
                log.exception("preparing the restore of request %s failed", job.id)
                job.prep = None
            if job.prep is not None:
                busy += 1
                job.prep.future.add_done_callback(lambda _f: self.wake())

    def _admit_one(self, job: Job) -> bool:
        view = dataclasses.replace(job.prompt, tokens=job.context)
        prep, job.prep = job.prep, None
        lease = self.cache.acquire(view, job.family, record=job.preemptions == 0,   # one lookup per request
                                   prepared=prep)
        if lease is None:
            if not self._running:
                # nothing runs and still no room: the cache cannot hold this prompt at all
                self._waiting.remove(job)
                self._fail(job, FailureKind.KV_CACHE_FULL,
                           "not enough KV cache for this prompt; retry later or raise cache.gpu_hot_mb")
                return True
            job.prep = prep            # (ready: kept for the next try)
            return False
        self._waiting.remove(job)
        job.seq, job.n_past, job.snapshot = lease.seq, lease.n_cached, lease.snapshot
        self._running.append(job)        # from here on a failure releases the sequence
        if job.t_admit is None:
            job.t_admit = time.monotonic()
            self.metrics.queue_seconds.observe(job.t_admit - job.t_submit)
        if job.preemptions == 0:
            job.n_cached, job.cache_source = lease.n_cached, lease.source
        if job.sampler is None:
            job.sampler = self.backend.make_sampler(job.params)
            job.stream = TextStream(job.stop)
        job.move(SessionState.PREFILL)
        return True

    def _build_batch(self) -> list[tuple[Job, BatchEntry]]:
        plan: list[tuple[Job, BatchEntry]] = []
        budget = self.backend.max_batch_tokens
        if self.cfg.step_tokens:
            budget = min(budget, self.cfg.step_tokens)
        for job in self._running:                      # decoding sequences first: one token each
            if job.state is SessionState.DECODE and budget > 0:
                plan.append((job, BatchEntry(job.seq, job.context[job.n_past:job.n_past + 1], job.n_past, True)))
                budget -= 1
        parked = self._share_prefixes()
        self.ttft_split["parked"] += len(parked)
        prefills = [j for j in self._prefill_order() if j not in parked]   # then prefill chunks
        if self.cfg.prefill_seqs is not None:
            prefills = prefills[:self.cfg.prefill_seqs]
        chunks: list[tuple[Job, int]] = []
        for job in prefills:
            if budget > 0:
                k = self._chunk(job, budget)
                chunks.append((job, k))
                budget -= k
        if self.cfg.finish_first and len(chunks) > 1:
            chunks = self._finishing_only(chunks)
        if self._microbatch_tokens and len(chunks) > 1:
            chunks = self._fewer_microbatches([(j.seq, 1) for j, _ in plan], chunks)
        for job, k in chunks:
            end = job.n_past + k
            plan.append((job, BatchEntry(job.seq, job.context[job.n_past:end], job.n_past, end == len(job.context))))
        return plan

    def _chunk(self, job: Job, budget: int) -> int:
        """The prompt tokens ``job`` adds to this step: its next ``prefill_chunk``, within
        ``budget``, ending at its family's boundary while the family prefix is computed."""
        k = min(len(job.context) - job.n_past, self.cfg.prefill_chunk, budget)
        if job.family.length > job.n_past and job.snapshot is None:
            k = min(k, job.family.length - job.n_past) or k  # end a chunk at the family boundary
        return k

    def _finishing_only(self, chunks: list[tuple[Job, int]]) -> list[tuple[Job, int]]:
        """``finish_first``: when some chunk ends its prompt (that request's first token comes
        out of this step), the chunks that do not end theirs wait for a step without one, unless
        their request has waited ``prefill_aging_s``: on a CPU a step's time grows with its
        tokens, so a long prompt's chunk in the same step delays a short prompt's first token."""
        if not any(j.n_past + k == len(j.context) for j, k in chunks):
            return chunks
        now = time.monotonic()
        kept = [(j, k) for j, k in chunks
                if j.n_past + k == len(j.context) or now - j.t_submit >= self.cfg.prefill_aging_s]
        self.finish_first_deferred += len(chunks) - len(kept)
        return kept

    def _fewer_microbatches(self, decoding: list[tuple[int, int]],
                            chunks: list[tuple[Job, int]]) -> list[tuple[Job, int]]:
        """The step's prefill chunks (in priority order), changed where that saves passes of
        the model (:meth:`ExecutionBackend.micro_batches`; with a KV stream per sequence
        llama.cpp batches only sequences of consecutive ids, equally many tokens each):

        - the chunks of each run of consecutive sequence ids are cut to the run's shortest,
          when the tokens cut are worth fewer micro-batches than they save;
        - a chunk after the first that still costs a micro-batch of its own and is smaller
          than ``microbatch_tokens`` waits for a later step (it is the shortest remaining,
          so it comes first then, unless other ones that short come before it).

        ``microbatch_tokens`` is what one micro-batch costs beyond its tokens, in tokens."""
        worth = self._microbatch_tokens
        count = self.backend.micro_batches
        ks = {job: k for job, k in chunks}

        def passes() -> int:
            return count(decoding + [(j.seq, k) for j, k in ks.items()])

        base = passes()
        by_seq = sorted(ks, key=lambda j: j.seq)
        runs: list[list[Job]] = []
        for job in by_seq:
            if runs and job.seq == runs[-1][-1].seq + 1:
                runs[-1].append(job)
            else:
                runs.append([job])
        for run in runs:
            if len(run) < 2 or len({ks[j] for j in run}) == 1:
                continue
            short = min(ks[j] for j in run)
            before = {j: ks[j] for j in run}
            for j in run:
                ks[j] = short
            now = passes()
            if base - now > 0 and sum(before.values()) - short * len(run) <= (base - now) * worth:
                base = now
            else:
                ks.update(before)
        first = chunks[0][0]
        for job, _ in reversed(chunks):
            if job is first or ks[job] >= worth:
                continue
            k = ks.pop(job)
            now = passes()
            if now < base:
                base = now
            else:
                ks[job] = k
        self.microbatch_plans["trimmed_tokens"] += sum(k for _, k in chunks) - sum(ks.values())
        return [(j, ks[j]) for j, _ in chunks if j in ks]

    def _share_prefixes(self) -> set[Job]:
        """A family prefix is computed once, also when several requests of a new family arrive
        before its snapshot exists: a prefilling request whose family snapshot now exists adopts
        it (its own partial prefix is dropped), and among requests still computing one family's
        prefix all but the one furthest along wait for it (returned: not prefilled this step).
        When the prefix gives no snapshot, the waiting ones go on by themselves once the one
        ahead has passed it."""
        if self.cfg.implicit_families:
            self._implicit_families()
        groups: dict[tuple[str, str], list[Job]] = {}
        for job in self._running:
            if (job.state is not SessionState.PREFILL or job.snapshot is not None
                    or job.n_past >= job.family.length or not self.cache.shares_prefix(job.family)):
                continue
            snap, n = self.cache.adopt_snapshot(job.seq, job.n_past, job.context, job.family)
            if snap is not None or n != job.n_past:
                job.n_past, job.snapshot = n, snap
                if snap is not None:
                    job.n_cached = max(job.n_cached, n)
                continue
            groups.setdefault((job.family.scope, job.family.digest), []).append(job)
        parked: set[Job] = set()
        for jobs in groups.values():
            if len(jobs) > 1:
                lead = max(jobs, key=lambda j: (j.n_past, -j.t_submit))
                parked.update(j for j in jobs if j is not lead)
        return parked

    def _implicit_families(self) -> None:
        """Prompts without a family of their own (raw completions) that arrive together and
        share their first tokens -- at least a snapshot's worth, within one namespace -- get
        one implicit family of their common prefix, so :meth:`_share_prefixes` has it computed
        once, as for a declared family. Requests that share less with the one furthest along
        keep going by themselves."""
        head = self.cache.min_snapshot_tokens
        by_head: dict[tuple[str, str, tuple[int, ...]], list[Job]] = {}
        known: dict[tuple[str, str, tuple[int, ...]], list[Job]] = {}     # prefilling ones with a family
        for job in self._running:
            if job.state is not SessionState.PREFILL or len(job.context) <= head:
                continue
            key = (job.family.namespace, job.family.scope, tuple(job.context[:head]))
            if job.snapshot is None and job.family.length == 0:
                by_head.setdefault(key, []).append(job)
            elif job.family.length >= head:
                known.setdefault(key, []).append(job)
        for key, jobs in by_head.items():
            for job in list(jobs):              # a family some request is already computing: join it
                other = next((o for o in known.get(key, ()) if o.family.length < len(job.context)
                              and o.context[:o.family.length] == job.context[:o.family.length]), None)
                if other is not None:
                    job.family = other.family
                    jobs.remove(job)
            if len(jobs) < 2:
                continue
            lead = max(jobs, key=lambda j: (j.n_past, -j.t_submit))
            ref = np.asarray(lead.context)
            lcp = {j: common_prefix_len(ref, np.asarray(j.context)) for j in jobs if j is not lead}
            members = [lead] + [j for j, n in lcp.items() if n >= head]
            if len(members) < 2:
                continue
            n = min([lcp[j] for j in members[1:]] + [len(j.context) - 1 for j in members])
            if n < head or not self.cache.shares_prefix(
                    family := self.cache.implicit_family(lead.family, lead.context, n)):
                continue
            for job in members:
                job.family = family

    def _prefill_order(self) -> list[Job]:
        jobs = [j for j in self._running if j.state is SessionState.PREFILL]
        if self.cfg.prefill_order == "fifo" or len(jobs) < 2:
            return jobs
        now = time.monotonic()

        def key(j: Job) -> tuple:
            if now - j.t_submit >= self.cfg.prefill_aging_s:
                return (0, 0, j.t_submit)              # aged: oldest first, ahead of the rest
            return (1, len(j.context) - j.n_past, j.t_submit)
        order = sorted(jobs, key=key)
        if self.cfg.prefill_order == "fair":
            # the oldest prefill gets the first chunk of every step, so a long one (a miss) is
            # never starved by a stream of short ones; the rest of the budget goes shortest first
            oldest = min(jobs, key=lambda j: j.t_submit)
            order.remove(oldest)
            order.insert(0, oldest)
        return order

    def _preempt_newest(self) -> bool:
        if len(self._running) <= 1:
            return False
        job = self._running[-1]
        job.preemptions += 1
        self.metrics.preemptions.inc()
        log.info("preempting request %s for lack of KV cells", job.id)
        job.move(SessionState.QUEUED)
        self._release(job, keep=True, close_sampler=False)   # its KV stays cached (evictable); it resumes from there
        self._waiting.appendleft(job)
        return True

    def _decode_step(self) -> None:
        while True:
            plan = self._build_batch()
            if not plan:
                return
            n_tokens = sum(len(e.tokens) for _, e in plan)
            protect = {j.snapshot for j, _ in plan if j.snapshot is not None}
            if not self.cache.ensure_cells(n_tokens, protect):
                if self._preempt_newest():
                    continue
                if len(plan) == 1 and len(plan[0][1].tokens) > 1:
                    pass  # a single prefill; let llama.cpp try (ledger is conservative)
            t0 = time.perf_counter()
            try:
                outputs = self.backend.decode([e for _, e in plan])
            except KVCacheFullError:
                # unified: evict until the cells llama.cpp wanted are free, else preempt; streams:
                # evicting frees no cell of a running sequence's stream, so only preempting helps
                if ((not self.cache.streams and self.cache.ensure_cells(self.cache.ledger.free + n_tokens, protect))
                        or self._preempt_newest()):
                    continue
                for job, _ in plan:
                    self._fail(job, FailureKind.KV_CACHE_FULL, "the KV cache is full; retry later")
                return
            except BackendError as exc:
                log.error("decode failed: %s", exc)
                for job, _ in plan:
                    self._fail(job, FailureKind.MODEL, f"the model failed to decode: {exc}")
                return
            break
        dt = time.perf_counter() - t0
        step_s = dt
        self.step_split["decode"] += dt
        self._split_metric["decode"].inc(dt)
        self.steps += 1
        self.metrics.batch_tokens.observe(n_tokens)
        n_prefill = sum(len(e.tokens) for j, e in plan if j.state is SessionState.PREFILL)
        self.metrics.batch_seqs.observe(len(plan))
        passes = self.backend.micro_batches([(e.seq, len(e.tokens)) for _, e in plan])
        self.microbatch_plans["passes"] += passes
        self._microbatches.observe(passes)
        self.max_batch_seqs_seen = max(self.max_batch_seqs_seen, len(plan))
        sampling: list[tuple[Job, int]] = []
        for (job, entry), out in zip(plan, outputs):
            k = len(entry.tokens)
            self.cache.note_decoded(job.seq, k)
            job.n_past += k
            if job.state is SessionState.PREFILL:
                job.snapshot = self.cache.maybe_snapshot(job.seq, job.n_past, job.context, job.family, job.snapshot)
            if out is None:
                continue
            if job.state is SessionState.PREFILL:
                job.move(SessionState.DECODE)
                if job.forks:
                    sampling.extend((child, out) for child in self._fork(job))
            sampling.append((job, out))
        if not sampling:
            self._count_step(n_prefill, step_s)
            return
        # every sequence's next token in one call (greedy rows: one argmax over the logits matrix)
        t0 = time.perf_counter()
        tokens = self.backend.sample_many([j.sampler for j, _ in sampling], [o for _, o in sampling])
        dt = time.perf_counter() - t0
        self.step_split["sample"] += dt
        self._split_metric["sample"].inc(dt)
        self._count_step(n_prefill, step_s + dt)
        self._generated.inc(len(tokens))
        for (job, out), token in zip(sampling, tokens):
            self._on_token(job, token, out)

    def _count_step(self, n_prefill: int, seconds: float) -> None:
        """A step's device time (llama_decode, and the sampling that waits for an accelerator
        to finish) by kind: with prefill tokens or decoding only. From these the analytics
        estimate what a prompt token costs to compute, beyond the decoding it rides along with."""
        kind = "prefill" if n_prefill else "decode"
        self._kind_steps[kind].inc()
        self._kind_seconds[kind].inc(seconds)
        if n_prefill:
            self._prefill_tokens.inc(n_prefill)

    def _fork(self, job: Job) -> list[Job]:
        """The prompt of ``job`` is done: start its other choices from the same cells and
        logits (returned: they sample from the parent's output row this step). A fork that
        gets no sequence now is queued as a request of its own (it prefills its prompt
        itself)."""
        forks, job.forks = job.forks, []
        now = time.monotonic()
        started: list[Job] = []
        for i, (params, sink) in enumerate(forks, 1):
            # t_first set: a choice is not a request of its own in the time-to-first-token figures
            child = Job(f"{job.id}/{i}", job.prompt, job.family, params, job.max_tokens, job.stop, sink,
                        logprobs=job.logprobs, parent=job, t_submit=now, t_first=now)
            child.context = list(job.context)
            child.n_cached, child.cache_source = job.n_cached, job.cache_source
            try:
                seq = self.cache.fork(job.seq, job.n_past, job.snapshot)
            except Exception:
                log.exception("sharing the prompt of request %s with choice %d failed", job.id, i)
                seq = None
            if seq is None:
                self._waiting.appendleft(child)
                continue
            child.seq, child.n_past, child.snapshot = seq, job.n_past, job.snapshot
            child.sampler = self.backend.make_sampler(params)
            child.stream = TextStream(job.stop)
            child.move(SessionState.PREFILL)
            child.move(SessionState.DECODE)
            self._running.append(child)
            started.append(child)
        return started

    def _emit_text(self, job: Job, text: str) -> None:
        if job.logprobs is None:
            self._emit(job, Token(text))
            return
        sent = len(job.stream.text.encode("utf-8", "replace")) if job.stream else job.n_bytes
        k = 0
        while k < len(job.lp_pending) and job.lp_pending[k][0] < sent:
            k += 1
        lps = [lp for _, lp in job.lp_pending[:k]]
        del job.lp_pending[:k]
        if job.stream is not None and job.stream.stopped:
            job.lp_pending.clear()           # tokens wholly past a stop string are not part of the reply
        if text or lps:
            self._emit(job, Token(text, lps))

    def _on_token(self, job: Job, token: int, out: int) -> None:
        job.generated += 1
        if job.t_first is None:
            job.t_first = time.monotonic()
            self.metrics.ttft.labels("hit" if job.n_cached > 0 else "miss").observe(job.t_first - job.t_submit)
            if job.t_admit is not None and job.parent is None:
                split = self.ttft_split
                split["queued"] += job.t_admit - job.t_submit
                split["admitted"] += job.t_first - job.t_admit
                split["n"] += 1
        if self.backend.is_eog(token) and not job.params.ignore_eos:
            self._finish(job, "stop")
            return
        piece = self.backend.token_piece(token)
        if job.logprobs is not None:
            job.lp_pending.append((job.n_bytes, self.backend.token_logprob(out, token, job.logprobs)))
        job.n_bytes += len(piece)
        text = job.stream.push(piece)
        if text or (job.stream.stopped and job.lp_pending):
            self._emit_text(job, text)
        if job.stream.stopped:
            self._finish(job, "stop")
        elif job.generated >= job.max_tokens or len(job.context) + 1 > self._n_ctx_seq:
            self._finish(job, "length")
        else:
            job.context.append(token)
