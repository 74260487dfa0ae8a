"""Benchmarks: ``kv3d bench`` (workload, peer baseline, report).

* :mod:`~kv3d_tools.bench.cli` -- the Hydra entry point (``conf/bench.yaml``), single runs and sweeps;
* :mod:`~kv3d_tools.bench.run` -- one run: every system on the same workload, then the report;
* :mod:`~kv3d_tools.bench.workload` / :mod:`~kv3d_tools.bench.textgen` -- the seeded chat workload;
* :mod:`~kv3d_tools.bench.driver` -- the async ``openai`` client load generator (TTFT, hits);
* :mod:`~kv3d_tools.bench.systems` -- kv3d, kv3d in safe mode, llama-cpp-python's server as subprocesses;
* :mod:`~kv3d_tools.bench.peer_state` -- what the peer's RAM prompt cache stores per conversation;
* :mod:`~kv3d_tools.bench.metrics` / :mod:`~kv3d_tools.bench.prom` -- figures from requests, stats and /metrics;
* :mod:`~kv3d_tools.bench.report` / :mod:`~kv3d_tools.bench.plots` / :mod:`~kv3d_tools.bench.summary` --
  report.json/.md, PNG plots, the combined table of a sweep.
"""
