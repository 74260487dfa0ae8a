"""What the analytics endpoint (``/v1/kv3d/analytics``, :mod:`kv3d_core.api.analytics`)
reads from the engine's cache: families, memory and the miss-ratio curve, read on the
scheduler thread (the cache's owner) in one call, after the metric gauges are refreshed, so
the figures and ``/metrics`` agree."""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

from kv3d_core.contracts.session import SessionState

if TYPE_CHECKING:  # pragma: no cover
    from kv3d_core.engine.engine import Engine

_SPECIAL = re.compile(r"<\|[^|>]*\|>|<[a-z_]*>")       # chat-template markers (<|im_start|>, <s>)


def preview_text(engine: "Engine", tokens: tuple[int, ...], words: int) -> str:
    """The first ``words`` words of a family prefix, template markers left out."""
    raw = b"".join(engine.backend.token_piece(t) for t in tokens).decode("utf-8", "replace")
    parts = _SPECIAL.sub(" ", raw).split()
    if parts and parts[0] in ("system", "user", "assistant"):
        parts = parts[1:]                       # the role the template names first
    text = " ".join(parts[:words])
    return text + (" …" if len(parts) > words else "")


def read_state(engine: "Engine", tenant: str | None, top: int, previews: bool, preview_words: int) -> dict:
    """Everything the report needs from the cache (run it on the scheduler thread)."""
    cache, workload = engine.cache, engine.workload
    cache.update_gauges()
    bpt = engine.info.kv_bytes_per_token
    sessions = [e for e in cache.entries() if e.kind == "session"]
    by_scope_family = Counter(e.family for e in sessions)
    mine, others = workload.visible_families(tenant)
    rows = []
    for (scope, digest), st in mine[:top]:
        snap = cache.snapshots.get((scope, digest))
        n_sessions = by_scope_family[digest] if snap is not None else 0
        snap_bytes = st.length * bpt
        rows.append({
            "id": digest[:12], "tokens": st.length, "requests": st.requests, "hits": st.hits,
            "hit_rate": st.hits / st.requests if st.requests else None,
            "sessions": n_sessions,
            "snapshot": None if snap is None else ("hot" if snap.hot else snap.state.value),
            "snapshot_bytes": snap_bytes if snap is not None else 0,
            "bytes_shared": snap_bytes * n_sessions if snap is not None else 0,
            "namespaces": len(st.namespaces),
            "preview": preview_text(engine, st.preview, preview_words) if previews else None,
        })
    tiers_of = Counter(("hot" if e.hot else e.state.value) for e in sessions
                       if e.hot or e.state in (SessionState.WARM, SessionState.COLD))
    mrc = workload.mrc
    return {
        "families": rows, "families_total": len(mine), "families_other_tenants": others,
        "families_tracked": len(workload.families),
        "stats": cache.stats(),
        "sessions_by_tier": dict(tiers_of),
        "session_tokens": sum(int(e.tokens.shape[0]) for e in sessions),
        "sessions_held": len(sessions),
        "bytes_per_token": bpt,
        "mrc": {"curve": mrc.curve(), "accesses": mrc.accesses, "sampled": mrc.sampled,
                "rate": mrc.rate, "snapshot_rate": mrc.class_rate(1), "tracked": mrc.tracked},
    }
