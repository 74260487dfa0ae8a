"""llama.cpp's own C++ ``llama-server`` as a benchmark peer: the server a user would pick instead.

The binary is the one ``scripts/build_llama.sh`` built from the llama.cpp source inside the
installed llama-cpp-python (same commit, same CPU/CUDA flags as kv3d's backend), found through
``$KV3D_LLAMA_SERVER``, else the path ``scripts/setup.sh`` recorded in the venv
(``<venv>/kv3d-llama-server``), else the wheelhouse's CPU build.

It is started with its best settings for the workload: ``--parallel`` = the bench's
concurrency; per-slot KV streams (``--no-kv-unified``; the ``llama_server_unified`` system is
the ``--kv-unified`` variant); its host-RAM prompt cache sized to kv3d's warm budget
(``--cache-ram``) with idle-slot export (``--cache-idle-slots``); the same threads and batch
sizes; a per-slot context large enough that no request is refused. Its log is read after the
run: a request refused for its context ("Context size has been exceeded") is a failed run, and
the prompt cache's size ("cache state: N prompts, X MiB", logged at verbosity 4) gives the bytes
per cached conversation.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = float(1 << 30)
_CACHE_STATE = re.compile(r"cache state: (\d+) prompts, ([0-9.]+) MiB")
_REFUSED = ("Context size has been exceeded", "exceeds the available context size")


def find_binary(explicit: str | None = None) -> tuple[str | None, str | None]:
    """(path to llama-server, None) or (None, why not)."""
    candidates: list[tuple[str, str]] = []
    if explicit:
        candidates.append((explicit, "llama_server.binary"))
    if os.environ.get("KV3D_LLAMA_SERVER"):
        candidates.append((os.environ["KV3D_LLAMA_SERVER"], "$KV3D_LLAMA_SERVER"))
    recorded = Path(sys.prefix) / "kv3d-llama-server"
    if recorded.is_file():
        candidates.append((recorded.read_text().strip(), str(recorded)))
    wheelhouse = Path(os.environ.get("KV3D_WHEELHOUSE", Path.home() / ".cache" / "kv3d" / "wheelhouse"))
    candidates += [(str(p), "the wheelhouse") for p in sorted(wheelhouse.glob("*/llama-server-*/llama-server"))]
    for path, where in candidates:
        if path and os.access(path, os.X_OK):
            return path, None
    tried = ", ".join(f"{p} ({w})" for p, w in candidates) or "nothing recorded"
    return None, (f"llama-server was not found (tried: {tried}); build it with scripts/build_llama.sh "
                  "(scripts/setup.sh does, once) or set KV3D_LLAMA_SERVER")


@dataclass(frozen=True)
class LlamaServerSettings:
    parallel: int
    ctx_per_slot: int
    threads: int
    n_batch: int
    n_ubatch: int
    cache_ram_mb: int
    unified: bool
    n_gpu_layers: int
    flash_attn: str
    extra_args: tuple[str, ...] = ()

    @property
    def ctx_total(self) -> int:
        return self.parallel * self.ctx_per_slot

    def argv(self, binary: str, model_path: str, model_id: str, port: int) -> list[str]:
        return [binary, "--model", model_path, "--alias", model_id, "--host", "127.0.0.1", "--port", str(port),
                "--parallel", str(self.parallel), "--ctx-size", str(self.ctx_total),
                "--kv-unified" if self.unified else "--no-kv-unified",
                "--cache-ram", str(self.cache_ram_mb), "--cache-idle-slots" if self.cache_ram_mb else "--no-cache-idle-slots",
                "--threads", str(self.threads), "--threads-batch", str(self.threads),
                "--batch-size", str(self.n_batch), "--ubatch-size", str(self.n_ubatch),
                "--n-gpu-layers", str(self.n_gpu_layers), "--flash-attn", self.flash_attn,
                "--cont-batching", "--metrics", "--slots", "--no-webui", "--log-verbosity", "4",
                *self.extra_args]

    def as_dict(self) -> dict[str, Any]:
        return {"parallel": self.parallel, "ctx_per_slot": self.ctx_per_slot, "ctx_total": self.ctx_total,
                "kv_unified": self.unified, "cache_ram_mb": self.cache_ram_mb, "cache_idle_slots": bool(self.cache_ram_mb),
                "threads": self.threads, "n_batch": self.n_batch, "n_ubatch": self.n_ubatch,
                "n_gpu_layers": self.n_gpu_layers, "flash_attn": self.flash_attn, "extra_args": list(self.extra_args)}


def refused_requests(log_text: str) -> int:
    """Requests the server refused because they did not fit its context."""
    return sum(log_text.count(s) for s in _REFUSED)


def cache_state(log_text: str) -> tuple[int, float] | None:
    """(prompts, MiB) of the last prompt-cache state it logged, or None."""
    found = _CACHE_STATE.findall(log_text)
    if not found:
        return None
    n, mib = found[-1]
    return int(n), float(mib)


def memory_figures(slots: list[dict], log_text: str, kv_bytes_per_token: int, settings: LlamaServerSettings) -> dict:
    """Bytes per resumable conversation and sessions per GiB.

    Memory: the KV buffer it allocates for its slots (``parallel x ctx_per_slot`` cells) plus its
    host-RAM prompt cache. Conversations: the slots that served a request (each keeps its last
    conversation) plus the prompts in the RAM cache. A slot's conversation that was also exported
    to the cache is counted twice: that favours llama-server."""
    used_slots = sum(1 for s in slots if "id_task" in s or s.get("is_processing"))
    state = cache_state(log_text)
    cached_prompts, cache_mib = state if state is not None else (0, 0.0)
    kv_bytes = settings.ctx_total * kv_bytes_per_token
    cache_bytes = cache_mib * (1 << 20)
    sessions = used_slots + cached_prompts
    per = (kv_bytes + cache_bytes) / sessions if sessions else None
    return {
        "kv_bytes_per_session": per,
        "sessions_per_gb": GIB / per if per else None,
        "resident_sessions": sessions,
        "kv_memory_bytes": kv_bytes + cache_bytes,
        "llama_server_memory": {"slot_kv_bytes": kv_bytes, "slots": len(slots), "slots_used": used_slots,
                                "ram_cache_prompts": cached_prompts, "ram_cache_bytes": cache_bytes,
                                "kv_bytes_per_token": kv_bytes_per_token},
        "sessions_per_gb_method": ("(slot KV buffer: parallel x ctx_per_slot cells, + RAM prompt-cache bytes) / "
                                   "(slots that served a conversation + prompts in the RAM cache), at the end "
                                   "of the run; a conversation both in a slot and in the cache counts twice"),
    }
