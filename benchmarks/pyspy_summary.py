"""Where kv3d's scheduler thread spends its wall time, from a py-spy raw profile.

    python benchmarks/pyspy_summary.py docs/benchmarks/gpu-h200-side/pyspy-kv3d-c32.txt.gz

The profile is what ``scripts/gpu/pipeline.sh``'s ``profile`` stage records
(``py-spy record --idle --threads -f raw``: every thread, sleeping samples included), so
the shares below add up to the scheduler thread's whole life while it served requests:
time in llama_decode, in sampling, in admission (prefix loads, restores, snapshots), in
spills of finished sessions, and waiting for work.

With ``--gil`` the profile is ``py-spy record --gil --threads -f raw`` (only the thread holding
the GIL is sampled; ``pipeline.sh``'s ``decodeprof`` stage): it prints each thread's share of
the recording's wall time (``--seconds``) holding the GIL, and what the busiest threads did with
it. The scheduler thread waits whenever another thread holds the GIL as its ``llama_decode``
returns, so the event loop's share bounds what serving costs each step.

    python benchmarks/pyspy_summary.py --gil --seconds 6 pyspy-decode-gil.txt
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re

# (label, a frame that marks it); the first match from the leaf up names a sample
PARTS = [
    ("llama_decode", "LlamaCppBackend.decode "),
    ("sampling", "LlamaCppBackend.sample_many "),
    ("spill of a finished session", "PrefixCache._spill_idle_sessions "),
    ("admission: restore / prefix load", "PrefixCache._acquire_from "),
    ("admission: implicit family snapshot", "PrefixCache._derive_snapshot "),
    ("snapshot of a family prefix", "PrefixCache.maybe_snapshot "),
    ("text, stop strings, events", "Scheduler._on_token "),
    ("idle (waiting for requests)", "Condition.wait "),
]


def summarize(path: str) -> tuple[int, collections.Counter]:
    opener = gzip.open if path.endswith(".gz") else open
    parts: collections.Counter = collections.Counter()
    total = 0
    with opener(path, "rt") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if "Scheduler._loop " not in stack:
                continue
            count = int(n)
            total += count
            frames = stack.split(";")
            label = "other"
            for frame in reversed(frames):
                hit = next((name for name, mark in PARTS if frame.startswith(mark)), None)
                if hit is not None:
                    label = hit
                    break
            parts[label] += count
    return total, parts


def gil_holders(path: str) -> dict[str, collections.Counter]:
    """Samples per thread name, and per thread its leaf-most kv3d/uvicorn/starlette frames."""
    opener = gzip.open if path.endswith(".gz") else open
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with opener(path, "rt") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            head = frames[0]
            name = head.split(": ", 1)[1] if head.startswith("thread") and ": " in head else "?"
            name = re.sub(r"_\d+$", "", name)          # a pool's threads together
            if "Scheduler._loop " in stack:
                name = "scheduler"
            ours = [fr for fr in frames if re.search(r"\((kv3d_core|plugins|kv3d_backend|uvicorn|starlette|fastapi)", fr)
                    or "kv3d_" in fr]
            leaf = ours[-1].split(" (")[0] if ours else frames[-1].split(" (")[0]
            out[name][leaf] += int(n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="py-spy raw output (collapsed stacks), optionally gzipped")
    ap.add_argument("--rate", type=float, default=200.0, help="py-spy's sampling rate (-r), samples per second")
    ap.add_argument("--gil", action="store_true", help="a --gil profile: GIL-holding time by thread")
    ap.add_argument("--seconds", type=float, default=None, help="the recording's duration (py-spy -d)")
    args = ap.parse_args()
    if args.gil:
        holders = gil_holders(args.profile)
        total = sum(sum(c.values()) for c in holders.values())
        wall = (args.seconds * args.rate) if args.seconds else total
        print(f"GIL held in {total} of {wall:.0f} samples ({100 * total / wall:.0f} % of the wall time)")
        print("| thread | share of wall time holding the GIL | where (leaf-most kv3d / server frames) |\n|---|---|---|")
        for name, c in sorted(holders.items(), key=lambda kv: -sum(kv[1].values())):
            top = ", ".join(f"{k} {100 * v / wall:.1f} %" for k, v in c.most_common(4))
            print(f"| {name} | {100 * sum(c.values()) / wall:.1f} % | {top} |")
        return
    total, parts = summarize(args.profile)
    if not total:
        raise SystemExit("no samples of the scheduler thread (Scheduler._loop) in this profile")
    print(f"scheduler thread: {total} samples = {total / args.rate:.1f} s")
    print("| part | share |\n|---|---|")
    for label, count in parts.most_common():
        print(f"| {label} | {100 * count / total:.1f} % |")


if __name__ == "__main__":
    main()
