"""The ``kv3d`` command: subcommands, their usage, and ``kv3d serve``'s flags (each the
shorthand of a Hydra override, so flags and overrides mix: ``kv3d serve --model m.gguf
--port 9000 codec=int8``)."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Callable, Sequence

from kv3d_core.errors import Kv3dError

USAGE = """\
usage: kv3d <command> [options] [overrides...]

An OpenAI-compatible inference server for GGUF models that shares prefix KV cache across
chat sessions and tiers the rest (hot/warm/cold).

commands:
  serve         start the server                       kv3d serve --model ./model.gguf
  config        print the composed configuration       kv3d config server.port=9000
  doctor        check this machine and configuration (exit 1 on a blocking problem)
  plugins       installed plugins (and their settings) as JSON

overrides are Hydra overrides of configs/config.yaml (`kv3d config` prints every key):
  server.port=9000  model.path=/models/m.gguf  cache.gpu_hot_mb=1024
  codec=int8  tier=ssd  detector=radix         (swappable groups; +codec=int8 works too)

`kv3d <command> --help` shows a command's own options. Installed plugins may add commands
(listed under "plugin commands"); `pip install kv3d[bench]` adds the tools (kv3d-tools):
bench, quality, synth-model and scale-sim."""

# kv3d serve's flags: flag -> (config key, value kind, help)
SERVE_FLAGS: dict[str, tuple[str, str, str, str]] = {
    "--model": ("model.path", "str", "PATH", "GGUF model file (default: the embedded SmolLM2-135M-Instruct Q4_1)"),
    "--port": ("server.port", "int", "N", "port to listen on (default 8080)"),
    "--host": ("server.host", "str", "H", "address to listen on (default 127.0.0.1; 0.0.0.0: every interface)"),
    "--api-key": ("server.api_key", "str", "K", "require 'Authorization: Bearer K' on /v1/* (the tenant 'default')"),
    "--threads": ("server.threads", "int", "N", "llama.cpp compute threads (default: every core)"),
}

SERVE_USAGE = """\
usage: kv3d serve [--model PATH] [--port N] [--host H] [--api-key K] [--threads N] [overrides...]

Start the OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models,
/health, /metrics).

options:
{flags}
  -h, --help       show this help

Each option is the shorthand of the override in brackets; options and overrides mix, and
when a key is given twice the later one wins.

most used settings (overrides, key=value; `kv3d config` prints every key):
  model.id=NAME                  name served by /v1/models (default: from the file name)
  server.api_keys={{a: k1, b: k2}} more tenants, each with its own cache namespace (prefix with +)
  server.cors_origins=[ORIGIN]   origins browsers may call from ('server.cors_origins=["*"]': any)
  server.default_max_tokens=N    completion limit when a chat request gives none
  cache.gpu_hot_mb=256           KV cells of the llama.cpp context (MiB)
  cache.ram_warm_mb=1024         host-RAM tier budget (MiB)
  tier=ssd cache.ssd_cold_path=DIR    a cold tier on disk (sessions survive restarts)
  codec=int8                     int8 session deltas (about half the bytes)
  scheduler.max_running=32       requests decoding at once
  backend.n_gpu_layers=-1        offload every layer (CUDA builds)
  safe_mode=true                 no cache reuse at all

examples:
  kv3d serve --model ./model.gguf
  kv3d serve --model ./model.gguf --port 9000 --api-key s3cret codec=int8 tier=ssd"""


def serve_usage() -> str:
    lines = [f"  {(f + ' ' + meta).ljust(15)}  {help_} [{key}]" for f, (key, _, meta, help_) in SERVE_FLAGS.items()]
    return SERVE_USAGE.format(flags="\n".join(lines))


class UsageError(Kv3dError):
    """A command line kv3d cannot read (exit 2, with the usage)."""


def _quoted(value: str) -> str:
    """``value`` as a Hydra override value that reads back exactly: quoted, quotes and the
    backslashes before them escaped, OmegaConf interpolation (``${``) disabled."""
    v = value.replace("${", "\\${")
    v = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", v)
    v = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, v)
    return "'" + v + "'"


def serve_overrides(args: Sequence[str]) -> list[str] | None:
    """``kv3d serve``'s arguments as Hydra overrides (flags become ``key=value`` in place);
    None when help was asked for. Raises :class:`UsageError`."""
    out: list[str] = []
    it = iter(range(len(args)))
    args = list(args)
    for i in it:
        a = args[i]
        if a in ("-h", "--help"):
            return None
        if not a.startswith("-"):
            out.append(a)
            continue
        flag, eq, value = a.partition("=")
        if flag not in SERVE_FLAGS:
            raise UsageError(f"unknown option {flag!r} (settings are overrides such as server.port=9000)")
        if not eq:
            j = next(it, None)
            if j is None:
                raise UsageError(f"{flag} needs a value")
            value = args[j]
        key, kind, _, _ = SERVE_FLAGS[flag]
        if kind == "int":
            if not re.fullmatch(r"-?[0-9]{1,9}", value.strip()):
                raise UsageError(f"{flag} takes a whole number, not {value!r}")
            out.append(f"{key}={int(value)}")
        else:
            if not value:
                raise UsageError(f"{flag} needs a non-empty value")
            out.append(f"{key}={_quoted(value)}")
    return out


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: Sequence[str]) -> int:
    from kv3d_core.api.app import create_app
    from kv3d_core.api.server import serve
    from kv3d_core.config import compose
    from kv3d_core.engine.engine import Engine

    overrides = serve_overrides(args)
    if overrides is None:
        print(serve_usage())
        return 0
    cfg = compose(overrides)
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
                         cors_origins=list(cfg.server.cors_origins), close_engine_on_shutdown=True,
                         drain_s=cfg.server.drain_s, metrics_public=cfg.server.metrics_public,
                         analytics=dict(cfg.analytics))
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

    overrides = serve_overrides(args)
    if overrides is None:
        print("usage: kv3d config [--model PATH] [--port N] [--host H] [--api-key K] [--threads N] [overrides...]\n\n"
              "Print the configuration `kv3d serve` would use with these options and overrides\n"
              "(configs/config.yaml < ~/.config/kv3d/config.json < the command line).")
        return 0
    print(OmegaConf.to_yaml(compose(overrides)), end="")
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
}


def _command_help(cmd: str, rest: Sequence[str]) -> bool:
    """``kv3d config --help`` and the like for commands without options of their own."""
    if cmd == "plugins" and any(a in ("-h", "--help") for a in rest):
        print("usage: kv3d plugins\n\nInstalled plugins as JSON: name, kind, version, distribution, settings; the\n"
              "commands and doctor checks plugins add; broken plugins with the reason.")
        return True
    return False


def _plugin_commands() -> dict:
    """The subcommands installed plugins register (``register_commands``); empty when the
    plugins cannot even be enumerated (``kv3d plugins`` / ``kv3d doctor`` say why)."""
    from kv3d_core.plugins import make_plugin_manager

    try:
        return make_plugin_manager().commands()
    except Kv3dError as exc:
        logging.getLogger("kv3d").warning("plugin commands unavailable: %s", exc)
        return {}


def usage() -> str:
    """:data:`USAGE`, plus the commands installed plugins add."""
    extra = _plugin_commands()
    if not extra:
        return USAGE
    lines = [f"  {name.ljust(12)}  {c.help or '(no help)'}  [{c.source.distribution}]"
             for name, c in sorted(extra.items())]
    head, sep, tail = USAGE.partition("\n\noverrides are")
    return head + "\n\nplugin commands:\n" + "\n".join(lines) + sep + tail


def _plugin_command(cmd: str) -> Callable[[Sequence[str]], int] | None:
    command = _plugin_commands().get(cmd)
    if command is None:
        return None

    def run(args: Sequence[str]) -> int:
        code = command.run(list(args))
        if code is None:
            return 0
        if isinstance(code, bool) or not isinstance(code, int):
            raise Kv3dError(f"command {cmd!r} of {command.source.distribution} returned {code!r}, not an exit status")
        return code

    return run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    fn = COMMANDS.get(cmd) or _plugin_command(cmd)
    if fn is None:
        print(f"kv3d: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if _command_help(cmd, rest):
        return 0
    try:
        return fn(rest)
    except UsageError as exc:
        print(f"kv3d {cmd}: {exc}\n\n" + (serve_usage() if cmd in ("serve", "config") else usage()), file=sys.stderr)
        return 2
    except Kv3dError as exc:
        print(f"kv3d {cmd}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
