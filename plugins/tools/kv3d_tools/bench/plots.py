"""PNG plots of a report (matplotlib, Agg backend: no display needed).

Per run: ``ttft.png`` (TTFT p50/p95 of hits and misses per system),
``memory_per_session.png`` (KV bytes per session by tier, codec in the label,
against the peers: llama-server's slot KV and RAM cache, llama-cpp-python's cached
state), ``sessions_per_gb.png``.
Per sweep: the same memory and sessions-per-GiB plots with one group per run.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 1 << 20


def _bars(ax, labels: list[str], series: dict[str, list[float | None]], ylabel: str, log: bool = False) -> None:
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, vals) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        ys = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(xs, ys, width, label=name)
        for b, v in zip(bars, vals):
            if v is None:
                ax.annotate("n/a", (b.get_x() + b.get_width() / 2, 0), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=15 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center",
                       fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if series:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def ttft(systems: list[dict], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [s["name"] for s in systems]
    _bars(ax, labels, {
        "p50 hit": [s.get("ttft_p50_hit_s") for s in systems],
        "p50 miss": [s.get("ttft_p50_miss_s") for s in systems],
        "p95 hit": [s.get("ttft_p95_hit_s") for s in systems],
        "p95 miss": [s.get("ttft_p95_miss_s") for s in systems],
    }, "time to first token (s)")
    ax.set_title("TTFT: prefix hits vs misses")
    return _save(fig, path)


def _memory_rows(systems: list[dict], prefixes: list[str] | None) -> tuple[list[str], dict[str, list[float | None]]]:
    labels: list[str] = []
    series: dict[str, list[float | None]] = {"hot": [], "warm": [], "cold": [], "peer state": [], "peer held": [],
                                             "llama-server slot KV": [], "llama-server RAM cache": []}
    for i, s in enumerate(systems):
        tiers = s.get("kv_by_tier") or {}
        is_peer = "held_bytes_per_session" in s
        lsm = s.get("llama_server_memory")
        if lsm is not None:
            n = s.get("resident_sessions") or 0
            labels.append(f"{prefixes[i]}\n{s['name']}" if prefixes else s["name"])
            for k in series:
                series[k].append(None)
            if n:
                series["llama-server slot KV"][-1] = lsm["slot_kv_bytes"] / n / MIB
                series["llama-server RAM cache"][-1] = (lsm["ram_cache_bytes"] / n / MIB) or None
            continue
        if not tiers and not is_peer:
            continue
        vals = {t: (tiers.get(t) or {}).get("bytes_per_session") for t in ("hot", "warm", "cold")}
        if not is_peer and not any(vals.values()):
            continue          # nothing resident (safe mode): no bar to draw
        cfg = s.get("config") or {}
        label = s["name"] if is_peer else f"{s['name']}\ncodec={cfg.get('codec')} tier={cfg.get('tier')}"
        labels.append(f"{prefixes[i]}\n{s['name']}" if prefixes else label)
        for t, v in vals.items():
            series[t].append(v / MIB if v else None)
        series["peer state"].append(s["kv_bytes_per_session"] / MIB if is_peer and s.get("kv_bytes_per_session") else None)
        series["peer held"].append(s["held_bytes_per_session"] / MIB if is_peer and s.get("held_bytes_per_session") else None)
        series["llama-server slot KV"].append(None)
        series["llama-server RAM cache"].append(None)
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    return labels, series


def memory_per_session(systems: list[dict], path: Path, labels_prefix: list[str] | None = None) -> str:
    fig, ax = plt.subplots(figsize=(8, 4))
    labels, series = _memory_rows(systems, labels_prefix)
    _bars(ax, labels, series or {"none": [None] * len(labels)}, "KV MiB per resumable session", log=bool(series))
    ax.set_title("KV memory per resumable session: kv3d by tier (codec in label) vs the peers")
    return _save(fig, path)


def sessions_per_gb(labels: list[str], series: dict[str, list[float | None]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, labels, series, "sessions per GiB of KV memory")
    ax.set_title("Resumable sessions per GiB of KV memory")
    return _save(fig, path)


def run_plots(report: dict, out: Path) -> list[str]:
    systems = report["systems"]
    names = [s["name"] for s in systems]
    return [
        ttft(systems, out / "ttft.png"),
        memory_per_session(systems, out / "memory_per_session.png"),
        sessions_per_gb(names, {"sessions/GiB": [s.get("sessions_per_gb") for s in systems]},
                        out / "sessions_per_gb.png"),
    ]


def sweep_plots(runs: list[dict], out: Path) -> list[str]:
    """``runs``: [{"label", "report"}] of every job of a multirun."""
    labels = [r["label"] for r in runs]
    series: dict[str, list[float | None]] = {}
    for name in ("kv3d", "llama_server", "llamacpp_peer"):
        vals = [next((s.get("sessions_per_gb") for s in r["report"]["systems"] if s["name"] == name), None) for r in runs]
        if any(v is not None for v in vals):
            series[name] = vals
    kv = [(r["label"], next((s for s in r["report"]["systems"] if s["name"] == "kv3d"), None)) for r in runs]
    kv = [(lbl, s) for lbl, s in kv if s is not None]
    peers = [next((s for r in runs for s in r["report"]["systems"] if s["name"] == n), None)
             for n in ("llama_server", "llamacpp_peer")]
    mem_systems = [s for _, s in kv] + [p for p in peers if p]
    mem_labels = [lbl for lbl, _ in kv] + [p["name"] for p in peers if p]
    return [
        sessions_per_gb(labels, series or {"kv3d": [None] * len(labels)}, out / "sessions_per_gb.png"),
        memory_per_session(mem_systems, out / "memory_per_session.png", mem_labels),
    ]
