"""The benchmark workload: a seeded, deterministic list of chat requests.

Given a :class:`WorkloadSpec` the plan is fixed (same seed -> same requests,
same texts). A request is either

* the first turn of a new session, whose system prompt is one of ``families``
  shared documents (with probability ``shared_ratio``, assigned exactly over the
  new sessions) or a document of its own; or
* a follow-up turn (a ``turns`` share of the requests) of an earlier session:
  the session's whole history -- system prompt, every user message, every reply
  actually received -- plus a new user message, as OpenAI clients resend it.

With ``branch_regenerate`` / ``branch_fork`` (the branching workload; both 0 by default, and
then the plan is exactly the one without them), a request may instead start a *branch* of an
earlier request ``r`` of another session -- a new session that shares ``r``'s history:

* regenerate or edit (``branch_regenerate``): ``r``'s history before its last user message, then
  that message again (regenerate, half of them) or a new one (edit), as a chat UI's retry and
  edit buttons send it;
* fork (``branch_fork``): ``r``'s whole history with the reply it received, then a new message,
  as an agent framework exploring alternatives from one point does.

A branch session may get follow-up turns and branches of its own; the session it branched from
stays resumable too.

``branch_min_turns`` (1 by default: any session) takes branches only from sessions that have had
at least that many turns: a chat UI's retry or edit of the latest turn of a conversation some
turns long, an agent forking a history of several steps. With 1, most branches start from a
one-turn session, whose history beyond the shared system prompt is one user message (and, for a
fork, its reply); with 2 or more, a branch repeats at least one whole earlier exchange. A request
drawn as a branch when no session is eligible starts a new session, as with 1 early in the run.

A follow-up never targets a session whose previous turn is among the last
``followup_gap`` requests, so at that distance it has usually finished; the
driver still waits for it (:attr:`PlannedRequest.parent`). A session gets at
most ``max_turns`` turns, which bounds the context.

``reusable`` marks requests a prefix cache can serve in part: a follow-up, or a
shared-family session after its family's first request.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

from kv3d_tools.bench import textgen

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class WorkloadSpec:
    requests: int = 1000
    shared_ratio: float = 0.8
    families: int = 4
    system_prompt_tokens: int = 1024
    unique_tokens: int = 128
    turns: float = 0.3
    seed: int = 0
    max_turns: int = 4
    followup_gap: int = 8
    followups_last: bool = False
    branch_regenerate: float = 0.0
    branch_fork: float = 0.0
    branch_min_turns: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.requests < 1:
            problems.append("requests must be >= 1")
        if not 0.0 <= self.shared_ratio <= 1.0:
            problems.append("shared_ratio must be within 0..1")
        if not 0.0 <= self.turns < 1.0:
            problems.append("turns must be within 0..1 (exclusive): the first request starts a session")
        if self.families < 1 and self.shared_ratio > 0:
            problems.append("families must be >= 1 when shared_ratio > 0")
        if self.system_prompt_tokens < 1 or self.unique_tokens < 1:
            problems.append("system_prompt_tokens and unique_tokens must be >= 1")
        if self.max_turns < 1 or self.followup_gap < 0:
            problems.append("max_turns must be >= 1 and followup_gap >= 0")
        if self.branch_regenerate < 0 or self.branch_fork < 0 or self.turns + self.branch_regenerate \
                + self.branch_fork >= 1.0:
            problems.append("branch_regenerate and branch_fork must be >= 0, and with turns sum to less than 1")
        if self.branch_min_turns < 1:
            problems.append("branch_min_turns must be >= 1")
        if self.followups_last and (self.branch_regenerate or self.branch_fork):
            problems.append("followups_last does not take branches")
        if problems:
            raise ValueError("bad workload: " + "; ".join(problems))


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    session: int
    turn: int                 # 0 = first turn of the session
    family: int | None        # shared family of the session's system prompt; None = a prompt of its own
    user: str                 # this turn's new user message
    parent: int | None        # index of the session's previous turn (None on turn 0)
    reusable: bool            # a prefix cache can serve part of it (see the module docstring)
    branch: str | None = None  # "regenerate", "edit" or "fork": the first request of a branch session


@dataclass
class Workload:
    spec: WorkloadSpec
    family_prompts: list[str]
    session_prompts: dict[int, str]          # session -> system prompt
    requests: list[PlannedRequest]
    session_family: dict[int, int | None] = field(default_factory=dict)
    session_root: dict[int, int] = field(default_factory=dict)   # a branch session -> the session it shares a prompt with

    def system_prompt(self, session: int) -> str:
        return self.session_prompts[session]

    def messages(self, req: PlannedRequest, replies: Mapping[int, str]) -> list[dict]:
        """The chat messages of ``req``: the session's history with the reply each
        earlier turn actually received (``replies``: request index -> text)."""
        chain: list[PlannedRequest] = []
        r: PlannedRequest | None = req
        while r is not None:
            chain.append(r)
            r = self.requests[r.parent] if r.parent is not None else None
        chain.reverse()
        msgs: list[dict] = [{"role": "system", "content": self.system_prompt(req.session)}]
        for turn in chain[:-1]:
            if turn.index not in replies:
                raise KeyError(f"request {req.index} follows request {turn.index}, which has no reply")
            msgs.append({"role": "user", "content": turn.user})
            msgs.append({"role": "assistant", "content": replies[turn.index]})
        msgs.append({"role": "user", "content": req.user})
        return msgs

    def token_prompt(self, req: PlannedRequest, n_vocab: int) -> list[int]:
        """``req`` as token ids, for models without a real tokenizer: the session's prefix (its
        family's, or its own) and each turn's new ids, seeded like the texts. A later turn resends
        the session's earlier prompt and its new ids (no reply: token-id prompts carry no text to
        resend), so it resumes the cached prompt."""
        lo = min(100, max(0, n_vocab // 4))

        def ids(key: str, n: int) -> list[int]:
            g = random.Random(key)
            return [g.randrange(lo, n_vocab) for _ in range(n)]

        chain: list[PlannedRequest] = []
        r: PlannedRequest | None = req
        while r is not None:
            chain.append(r)
            r = self.requests[r.parent] if r.parent is not None else None
        f = self.session_family.get(req.session)
        seed = self.spec.seed
        own = self.session_root.get(req.session, req.session)
        prefix_key = f"kv3d-bench:{seed}:family-ids:{f}" if f is not None else f"kv3d-bench:{seed}:system-ids:{own}"
        out = ids(prefix_key, self.spec.system_prompt_tokens)
        for turn in reversed(chain):
            out += ids(f"kv3d-bench:{seed}:user-ids:{turn.index}", self.spec.unique_tokens)
        return out

    def summary(self) -> dict:
        reqs = self.requests
        n = len(reqs)
        return {
            **asdict(self.spec),
            "sessions": len(self.session_prompts),
            "followups": sum(1 for r in reqs if r.turn > 0),
            "shared_requests": sum(1 for r in reqs if r.family is not None),
            "reusable_requests": sum(1 for r in reqs if r.reusable),
            "shared_share": sum(1 for r in reqs if r.family is not None) / n,
            "max_turn": max(r.turn for r in reqs),
            "branches": {k: sum(1 for r in reqs if r.branch == k) for k in ("regenerate", "edit", "fork")},
        }


Plan = tuple[int, int, "int | None", "str | None", "int | None"]
"""(session, turn, parent index, branch kind, the request a branch starts from) per request."""


def _plan_sessions(spec: WorkloadSpec, rng: random.Random) -> tuple[list[Plan], dict[int, int]]:
    """The plan of every request, and each session's root (a branch's: the session whose
    system prompt it shares; a session of its own otherwise)."""
    n_follow = round(spec.turns * spec.requests)
    if spec.followups_last:
        # every new session first, then the follow-ups, each resuming a session not resumed yet
        n_new = spec.requests - n_follow
        out: list[Plan] = [(s, 0, None, None, None) for s in range(n_new)]
        order = list(range(n_new))
        rng.shuffle(order)
        for k in range(n_follow):
            s = order[k % n_new]
            parent = max(i for i, p in enumerate(out) if p[0] == s)
            out.append((s, out[parent][1] + 1, parent, None, None))
        return out, {s: s for s in range(n_new)}
    follow_at = set(rng.sample(range(1, spec.requests), min(n_follow, spec.requests - 1)))
    branching = spec.branch_regenerate + spec.branch_fork > 0
    brng = random.Random(f"kv3d-bench:{spec.seed}:branch") if branching else None
    out = []
    last: dict[int, int] = {}      # session -> index of its latest turn
    n_turns: dict[int, int] = {}
    root: dict[int, int] = {}
    for i in range(spec.requests):
        if i in follow_at:
            eligible = [s for s, j in last.items() if j < i - spec.followup_gap and n_turns[s] < spec.max_turns]
            if eligible:
                s = rng.choice(eligible)
                out.append((s, n_turns[s], last[s], None, None))
                last[s], n_turns[s] = i, n_turns[s] + 1
                continue
        s = len(n_turns)
        branch = _branch(spec, brng, out, last, n_turns, i) if brng is not None else None
        if branch is not None:
            src, kind = branch
            turn, parent = (out[src][1], out[src][2]) if kind != "fork" else (out[src][1] + 1, src)
            out.append((s, turn, parent, kind, src))
            root[s] = root[out[src][0]]
            last[s], n_turns[s] = i, turn + 1
            continue
        out.append((s, 0, None, None, None))
        root[s] = s
        last[s], n_turns[s] = i, 1
    return out, root


def _branch(spec: WorkloadSpec, brng: random.Random, out: list[Plan], last: dict[int, int],
            n_turns: dict[int, int], i: int) -> tuple[int, str] | None:
    """Whether request ``i`` starts a branch: (the request it branches from: the latest turn of
    an earlier session with at least ``branch_min_turns`` turns, at least ``followup_gap`` requests
    back; its kind), or None."""
    u = brng.random() * (1.0 - spec.turns)
    if u >= spec.branch_regenerate + spec.branch_fork:
        return None
    fork = u >= spec.branch_regenerate
    eligible = [s for s, j in last.items() if j < i - spec.followup_gap and n_turns[s] >= spec.branch_min_turns
                and (not fork or n_turns[s] < spec.max_turns)]
    if not eligible:
        return None
    src = last[brng.choice(eligible)]
    return src, ("fork" if fork else brng.choice(("regenerate", "edit")))


def generate(spec: WorkloadSpec, count_tokens: TokenCounter | None = None, texts: bool = True) -> Workload:
    """The workload of ``spec``. ``count_tokens`` (the model's tokenizer) fits
    every text to its token target; without it a calibrated words-per-token
    ratio is used. ``texts=False`` plans the requests only (token-id prompts:
    :meth:`Workload.token_prompt`)."""
    rng = random.Random(f"kv3d-bench:{spec.seed}:plan")
    plan, root = _plan_sessions(spec, rng)
    sessions = sorted(s for s, r in root.items() if s == r)      # branches share their root's prompt
    n_shared = round(spec.shared_ratio * len(sessions)) if spec.families > 0 else 0
    shared = set(rng.sample(sessions, n_shared))
    session_family: dict[int, int | None] = {
        s: (rng.randrange(spec.families) if s in shared else None) for s in sessions}
    session_family.update({s: session_family[r] for s, r in sorted(root.items()) if s != r})

    def doc(key: str) -> str:
        if not texts:
            return key
        return textgen.fit_tokens(lambda w: textgen.policy_document(random.Random(key), w),
                                  spec.system_prompt_tokens, count_tokens)

    family_prompts = [doc(f"kv3d-bench:{spec.seed}:family:{f}") for f in range(spec.families)]
    session_prompts = {s: (family_prompts[f] if f is not None else doc(f"kv3d-bench:{spec.seed}:system:{s}"))
                       for s, f in session_family.items() if root[s] == s}
    session_prompts.update({s: session_prompts[r] for s, r in root.items() if s != r})

    requests: list[PlannedRequest] = []
    seen_family: set[int] = set()
    for i, (s, turn, parent, branch, src) in enumerate(plan):
        key = f"kv3d-bench:{spec.seed}:user:{i}"
        make = textgen.user_question if turn == 0 else textgen.follow_up
        user = (textgen.fit_tokens(lambda w, k=key, m=make: m(random.Random(k), w), spec.unique_tokens, count_tokens)
                if texts else key)
        if branch == "regenerate":
            user = requests[src].user              # the same message again: another reply to it
        f = session_family[s]
        reusable = turn > 0 or branch is not None or (f is not None and f in seen_family)
        if f is not None:
            seen_family.add(f)
        requests.append(PlannedRequest(i, s, turn, f, user, parent, reusable, branch))
    return Workload(spec, family_prompts, session_prompts, requests, session_family, root)


def context_tokens_needed(spec: WorkloadSpec, max_tokens: int, template_overhead: int = 16) -> int:
    """An upper estimate of the longest prompt + reply of the workload, in tokens."""
    per_turn = spec.unique_tokens * 1.1 + max_tokens + template_overhead
    return int(spec.system_prompt_tokens * 1.1 + template_overhead + spec.max_turns * per_turn + max_tokens)
