"""The ``kv3d`` command.

::

    kv3d serve [OVERRIDES...]      start the OpenAI-compatible server
    kv3d plugins                   installed plugins as JSON
    kv3d config [OVERRIDES...]     print the composed configuration
    kv3d doctor [OVERRIDES...]     check this machine and configuration
    kv3d quality [OVERRIDES...]    codec quality harness (KL, top-1, perplexity, ratio)
    kv3d bench [-m] [OVERRIDES...] benchmark a kv3d server against llama-cpp-python's server
    kv3d synth-model [OPTIONS]     write a synthetic GGUF of a named shape (GPU benchmarks)

OVERRIDES are Hydra overrides: ``server.port=9000``, ``model.path=/m.gguf``,
``+codec=int8``, ``+tier=ssd``, ``+detector=radix``.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Callable, Sequence

from kv3d_core.errors import Kv3dError

USAGE = __doc__ or ""


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: Sequence[str]) -> int:
    from kv3d_core.api.app import create_app
    from kv3d_core.api.server import serve
    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine

    cfg = compose(args)
    _setup_logging(cfg.server.log_level)
    # The scheduler thread gives up the GIL during every llama_decode and must get it back at
    # once when the GPU is done; with the default 5 ms switch interval it can wait behind the
    # event loop's JSON work for that long, a whole decode step on a GPU.
    sys.setswitchinterval(0.0005)
    log = logging.getLogger("kv3d")
    engine = Engine(cfg)
    try:
        engine.start()
        app = create_app(engine, api_key=cfg.server.api_key, api_keys=dict(cfg.server.api_keys),
                         max_body_mb=cfg.server.max_body_mb, default_max_tokens=cfg.server.default_max_tokens,
                         cached_tokens=cfg.server.cached_tokens, cached_tokens_block=cfg.server.cached_tokens_block,
                         close_engine_on_shutdown=True, drain_s=cfg.server.drain_s,
                         metrics_public=cfg.server.metrics_public)
        info = engine.info
        log.info("kv3d serving %s (%s, %d cells = %.0f MiB hot KV, %d sequences, codec=%s, tier=%s, detector=%s%s) "
                 "on http://%s:%d", info.model_id, info.architecture, info.n_ctx,
                 info.n_ctx * info.kv_bytes_per_token / 2**20, info.n_seq_max, cfg.codec.name, cfg.tier.name,
                 cfg.detector.name, ", SAFE MODE" if cfg.safe_mode else "", cfg.server.host, cfg.server.port)
        # SIGTERM drains: 503 to new requests, those in flight finish (server.drain_s), the rest
        # end with an error event; then the lifespan closes the engine (persisting idle sessions)
        serve(app, app.state.drainer, host=cfg.server.host, port=cfg.server.port, log_level=cfg.server.log_level)
    finally:
        engine.close()
    return 0


def cmd_plugins(args: Sequence[str]) -> int:
    from kv3d_core.plugins import make_plugin_manager

    print(json.dumps(make_plugin_manager().describe(), indent=2))
    return 0


def cmd_config(args: Sequence[str]) -> int:
    from omegaconf import OmegaConf

    from kv3d_core.config import compose

    print(OmegaConf.to_yaml(compose(args)), end="")
    return 0


def _lazy(module: str) -> Callable[[Sequence[str]], int]:
    """A subcommand living in its own module, imported only when used."""

    def run(args: Sequence[str]) -> int:
        import importlib

        return int(importlib.import_module(module).main(list(args)) or 0)

    return run


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "serve": cmd_serve,
    "plugins": cmd_plugins,
    "config": cmd_config,
    "doctor": _lazy("kv3d_core.doctor"),
    "quality": _lazy("kv3d_core.kv.quality"),
    "bench": _lazy("kv3d_core.bench.cli"),
    "synth-model": _lazy("kv3d_core.tools.synth_model"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    fn = COMMANDS.get(cmd)
    if fn is None:
        print(f"kv3d: unknown command {cmd!r}\n\n{USAGE.strip()}", file=sys.stderr)
        return 2
    try:
        return fn(rest)
    except Kv3dError as exc:
        print(f"kv3d {cmd}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
