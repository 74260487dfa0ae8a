"""The combined table of a multirun (``kv3d bench -m ...``).

Every job of a sweep writes ``<sweep dir>/<job num>/report.json``; after the
last job Hydra calls :class:`SweepSummary` (``hydra.callbacks`` in
``conf/bench.yaml``), which reads them all and writes into the sweep
directory:

* ``summary.json`` -- ``{"sweep_dir", "runs": [{"job", "label", "overrides",
  "systems", "ratios", "targets"}], "failed": [{"job", "overrides", "error"}]}``;
* ``summary.md`` -- one table, a row per (run, system), and each run's targets;
* ``sessions_per_gb.png`` and ``memory_per_session.png`` across the runs.

A run's label is its overrides minus those every run shares (``codec=int8
tier=ssd``). :func:`write_summary` can also be run by hand on a sweep dir:
``python -m kv3d_tools.bench.summary SWEEP_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from kv3d_tools.bench import plots, report

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    Callback = object  # type: ignore[misc,assignment]

SUMMARY_SYSTEM_KEYS = (*report.STABLE_SYSTEM_KEYS, "ttft_p50_s", "kv_by_tier", "stored_bytes_per_session",
                       "stored_sessions_per_gb", "restore_p50_warm_s", "codec_stats", "rss_peak_bytes", "held_bytes_per_session",
                       "n_hit", "n_miss", "errors")


def _job_key(p: Path) -> tuple[int, str]:
    return (int(p.name), p.name) if p.name.isdigit() else (1 << 30, p.name)


def collect(sweep_dir: Path) -> tuple[list[dict], list[dict]]:
    runs, failed = [], []
    for d in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=_job_key):
        f = d / "report.json"
        if f.is_file():
            runs.append({"job": d.name, "report": json.loads(f.read_text())})
        elif (d / "error.json").is_file():
            err = json.loads((d / "error.json").read_text())
            failed.append({"job": d.name, "overrides": err.get("overrides"), "error": err.get("error")})
        elif (d / ".hydra").is_dir():
            failed.append({"job": d.name, "overrides": None, "error": "no report.json (the job did not finish)"})
    common = set.intersection(*(set(r["report"].get("overrides") or []) for r in runs)) if len(runs) > 1 else set()
    for r in runs:
        ov = r["report"].get("overrides") or []
        r["label"] = " ".join(o for o in ov if o not in common) or f"job {r['job']}"
    return runs, failed


def write_summary(sweep_dir: Path) -> Path:
    sweep_dir = Path(sweep_dir)
    runs, failed = collect(sweep_dir)
    summary: dict[str, Any] = {
        "sweep_dir": str(sweep_dir),
        "runs": [{
            "job": r["job"], "label": r["label"], "overrides": r["report"].get("overrides"),
            "systems": [{k: s.get(k) for k in SUMMARY_SYSTEM_KEYS if k in s} for s in r["report"]["systems"]],
            "ratios": r["report"].get("ratios"),
            "targets": {k: {"met": t.get("met"), "value": t.get("value"), "why": t.get("why")}
                        for k, t in (r["report"].get("targets") or {}).items()},
        } for r in runs],
        "failed": failed,
    }
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    names = plots.sweep_plots(runs, sweep_dir) if runs else []
    lines = [f"# kv3d benchmark sweep: {len(runs)} run(s)", ""]
    if runs:
        w = runs[0]["report"]["workload"]
        lines += [f"Workload: {w['requests']} requests, shared_ratio {w['shared_ratio']}, {w['families']} families, "
                  f"system prompts ~{w['system_prompt_tokens']} tokens, user messages ~{w['unique_tokens']} tokens, "
                  f"turns {w['turns']}, branches (regenerate/edit, fork) {w.get('branch_regenerate', 0)}, "
                  f"{w.get('branch_fork', 0)} (from sessions of {w.get('branch_min_turns', 1)}+ turns), seed {w['seed']}; concurrency {runs[0]['report'].get('concurrency')}.", ""]
        header = report.system_table([], label="")[:2]
        rows: list[str] = []
        for r in runs:
            rows += report.system_table(r["report"]["systems"], label=r["label"])[2:]
        lines += [*header, *rows, "", "## Targets per run", ""]
        for r in runs:
            marks = ", ".join(f"{k}: { {True: 'met', False: 'missed', None: 'n/a'}[t.get('met')]}"
                              for k, t in (r["report"].get("targets") or {}).items())
            ratios = ", ".join(f"{k} {v:.3g}x" for k, v in (r["report"].get("ratios") or {}).items() if v is not None)
            lines.append(f"- `{r['label']}` ({r['job']}/report.md): {marks}" + (f"; ratios {ratios}" if ratios else ""))
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- job {f['job']} `{' '.join(f.get('overrides') or [])}`: {f['error']}" for f in failed]
    lines += ["", *[f"![{n}]({n})" for n in names], ""]
    out = sweep_dir / "summary.md"
    out.write_text("\n".join(lines))
    return out


class SweepSummary(Callback):  # type: ignore[misc]
    """Hydra callback: the combined summary once the last job of a sweep ended."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        path = write_summary(Path(str(config.hydra.sweep.dir)))
        print(f"kv3d bench: sweep summary {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m kv3d_tools.bench.summary SWEEP_DIR", file=sys.stderr)
        return 2
    print(write_summary(Path(argv[0])))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
