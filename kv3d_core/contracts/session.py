"""The session life cycle: one state machine shared by the scheduler, the
prefix layer and the storage tiers.

::

    QUEUED --admit--> PREFILL --prompt done--> DECODE --finish--> IDLE (resident, hot)
      ^                 |  \\                     |  \\                |     \\
      |                 |   cancel/error          |   cancel/error     |      evict (no tier) --> DROPPED
      +----preempt------+------------------------ +                    |
                                                                       spill --> WARM --spill--> COLD
                                                                                  |               |
    a new turn that extends an IDLE/WARM/COLD session resumes it:  ---------------+-- resume -----+--> PREFILL

- QUEUED: waiting for a sequence (bounded queue; 503 past its bound or timeout).
- PREFILL: the uncached part of the prompt is decoded in chunks.
- DECODE: one token per scheduler step, streamed as produced.
- IDLE: the turn is over; its cells stay in the context (family prefix shared
  with the snapshot), ready for the next turn.
- WARM / COLD: spilled to host RAM / a cold tier as an encoded delta; restored
  into a fresh sequence on resume.
- DROPPED: its cells were freed without a copy (cancelled, failed, evicted with no
  tier below, or safe mode).
"""

from __future__ import annotations

import enum


class SessionState(str, enum.Enum):
    QUEUED = "queued"
    PREFILL = "prefill"
    DECODE = "decode"
    IDLE = "idle"
    WARM = "warm"
    COLD = "cold"
    DROPPED = "dropped"


S = SessionState

TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    S.QUEUED: frozenset({S.PREFILL, S.DROPPED}),
    S.PREFILL: frozenset({S.PREFILL, S.DECODE, S.QUEUED, S.DROPPED}),
    S.DECODE: frozenset({S.DECODE, S.IDLE, S.QUEUED, S.DROPPED}),
    S.IDLE: frozenset({S.PREFILL, S.WARM, S.COLD, S.DROPPED}),
    S.WARM: frozenset({S.PREFILL, S.COLD, S.DROPPED}),
    S.COLD: frozenset({S.PREFILL, S.DROPPED}),
    S.DROPPED: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


def check_transition(old: SessionState, new: SessionState) -> SessionState:
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"session cannot go from {old.value} to {new.value}")
    return new
