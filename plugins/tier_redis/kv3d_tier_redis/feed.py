"""The feed of published entries: reading the stream the scripts announce puts and
removals on (:mod:`kv3d_tier_redis.scripts`), for :meth:`RedisTier.follow`.

A reader keeps a :class:`Cursor`: the id of the last stream entry it read and that
entry's sequence number ``n``. Each read asks for the entries after that id
(``XREAD``, in batches) and checks that their numbers go on from ``n`` one by one; a
jump means entries were trimmed before this reader got to them (``MAXLEN ~``) or the
store restarted (the counter starts again): the reader then reports a gap, and the
tier answers with a full listing (a rescan). Entries this server wrote itself are
passed over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

BATCH = 512
"""Stream entries asked for per ``XREAD``."""
MAX_BATCHES = 16
"""Batches read per call at most; the rest waits for the next call."""


@dataclass(frozen=True)
class Cursor:
    last_id: str
    last_n: int


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _field(fields: dict, name: str) -> str:
    value = fields.get(name.encode(), fields.get(name))
    return "" if value is None else _text(value)


def tail(call: Callable[[Callable[[Any], Any]], Any], key: str) -> Cursor:
    """A cursor at the end of the feed (nothing read yet counts as missed)."""
    out = call(lambda c: c.xrevrange(key, count=1))
    if not out:
        return Cursor("0-0", 0)
    entry_id, fields = out[0]
    try:
        return Cursor(_text(entry_id), int(_field(fields, "n")))
    except ValueError:
        return Cursor(_text(entry_id), -1)       # an entry not written by the scripts: rescan next


def read(call: Callable[[Callable[[Any], Any]], Any], key: str, cursor: Cursor,
         own: str) -> tuple[list[tuple[str, str]], Cursor, bool]:
    """``(events, new cursor, gap)``: the ``(op, member)`` other servers announced after
    ``cursor``, oldest first. ``gap``: some were missed (then no events, and the cursor
    is unchanged: the caller rescans and starts again from :func:`tail`)."""
    events: list[tuple[str, str]] = []
    last_id, last_n = cursor.last_id, cursor.last_n
    for _ in range(MAX_BATCHES):
        got = call(lambda c, since=last_id: c.xread({key: since}, count=BATCH))
        entries = _entries_of(got, key)
        for entry_id, fields in entries:
            try:
                n = int(_field(fields, "n"))
            except ValueError:
                return [], cursor, True
            if n != last_n + 1:
                return [], cursor, True
            last_id, last_n = _text(entry_id), n
            if _field(fields, "src") == own:
                continue
            events.append((_field(fields, "op"), _field(fields, "m")))
        if len(entries) < BATCH:
            break
    return events, Cursor(last_id, last_n), False


def _entries_of(got: Any, key: str) -> list:
    """The entries of ``key`` in an ``XREAD`` reply (RESP2, as the tier's client speaks:
    ``[[stream, [(id, fields), ...]]]``)."""
    for stream, entries in got or ():
        if _text(stream) == key:
            return entries
    return []
