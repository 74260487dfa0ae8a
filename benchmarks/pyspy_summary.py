"""Where kv3d's scheduler thread spends its wall time, from a py-spy raw profile.

    python benchmarks/pyspy_summary.py docs/benchmarks/gpu-h200-side/pyspy-kv3d-c32.txt.gz

The profile is what ``scripts/gpu/pipeline.sh``'s ``profile`` stage records
(``py-spy record --idle --threads -f raw``: every thread, sleeping samples included), so
the shares below add up to the scheduler thread's whole life while it served requests:
time in llama_decode, in sampling, in admission (prefix loads, restores, snapshots), in
spills of finished sessions, and waiting for work.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="py-spy raw output (collapsed stacks), optionally gzipped")
    ap.add_argument("--rate", type=float, default=200.0, help="py-spy's sampling rate (-r), samples per second")
    args = ap.parse_args()
    total, parts = summarize(args.profile)
    if not total:
        raise SystemExit("no samples of the scheduler thread (Scheduler._loop) in this profile")
    print(f"scheduler thread: {total} samples = {total / args.rate:.1f} s")
    print("| part | share |\n|---|---|")
    for label, count in parts.most_common():
        print(f"| {label} | {100 * count / total:.1f} % |")


if __name__ == "__main__":
    main()
