"""A small pure-Python reader of GGUF headers: metadata key/values and tensor infos.

Contract:

* :func:`read_gguf` parses a GGUF v2/v3 (little-endian) file's header -- magic,
  version, every metadata key/value of every type (arrays included) and, unless
  asked not to, the tensor infos -- from a path (memory-mapped, never read whole)
  or from a bytes-like buffer. Tensor data is never touched.
* Arrays longer than ``max_array_items`` are *skipped*, not materialized: fixed-size
  elements are jumped over in one step, string elements by their length prefixes
  only. They appear in the metadata as :class:`SkippedArray` (element type, count).
* Anything malformed -- truncation, bad magic, unsupported version, absurd counts or
  lengths, unknown value types, nested arrays, duplicate keys, invalid UTF-8 keys,
  bad alignment, tensor offsets that do not follow each other -- raises
  :class:`GGUFError` with the byte offset and what was wrong. Every length is
  checked against the bytes left before anything is allocated, so a damaged file
  can never cause a giant allocation.
* The rules follow llama.cpp's own loader (``ggml/src/gguf.cpp``): a file this
  reader accepts has a header llama.cpp accepts too.

:func:`kv_bytes_per_token` computes the KV-cache bytes one token needs from the
metadata, the way the llamacpp backend does (layers x KV heads x (K + V head dims)
x bytes per element; per-layer KV head counts are summed).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from kv3d_core.errors import Kv3dError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
MAX_ARRAY_ELEMENTS = 1024 * 1024 * 1024  # llama.cpp's GGUF_MAX_ARRAY_ELEMENTS
MAX_STRING_BYTES = 256 * 1024 * 1024      # a metadata string larger than this is refused

# GGUF value types -> (name, struct code, size); strings and arrays are handled apart.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY, \
    T_UINT64, T_INT64, T_FLOAT64 = range(13)
_SCALAR: dict[int, tuple[str, str, int]] = {
    T_UINT8: ("uint8", "B", 1),
    T_INT8: ("int8", "b", 1),
    T_UINT16: ("uint16", "H", 2),
    T_INT16: ("int16", "h", 2),
    T_UINT32: ("uint32", "I", 4),
    T_INT32: ("int32", "i", 4),
    T_FLOAT32: ("float32", "f", 4),
    T_BOOL: ("bool", "b", 1),
    T_UINT64: ("uint64", "Q", 8),
    T_INT64: ("int64", "q", 8),
    T_FLOAT64: ("float64", "d", 8),
}
TYPE_NAMES = {**{t: v[0] for t, v in _SCALAR.items()}, T_STRING: "string", T_ARRAY: "array"}

_QK_K = 256
#: ggml tensor types known to llama.cpp 0.3.36's ggml: id -> (name, block size, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 2 + 2 + _QK_K // 16 + _QK_K // 4),
    11: ("Q3_K", 256, 2 + _QK_K // 4 + _QK_K // 8 + 12),
    12: ("Q4_K", 256, 2 + 2 + _QK_K // 2 + 12),
    13: ("Q5_K", 256, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
    14: ("Q6_K", 256, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
    15: ("Q8_K", 256, 4 + _QK_K + _QK_K // 8),
    16: ("IQ2_XXS", 256, 2 + _QK_K // 4),
    17: ("IQ2_XS", 256, 2 + _QK_K // 4 + _QK_K // 32),
    18: ("IQ3_XXS", 256, 2 + _QK_K // 4 + _QK_K // 8),
    19: ("IQ1_S", 256, 2 + _QK_K // 8 + _QK_K // 16),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
    22: ("IQ2_S", 256, 2 + _QK_K // 4 + _QK_K // 16),
    23: ("IQ4_XS", 256, 2 + 2 + _QK_K // 2 + _QK_K // 64),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 2 + 4 * 13), 35: ("TQ2_0", 256, 2 + 64),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}

#: bytes per element of the KV cache types the backend accepts (``backend.type_k`` / ``type_v``).
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                 "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}


class GGUFError(Kv3dError):
    """The file is not a GGUF file this reader (and llama.cpp) can read."""


@dataclass(frozen=True)
class SkippedArray:
    """An array value longer than ``max_array_items``: its type and length, no values."""

    item_type: str
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the start of the data section

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def nbytes(self) -> int:
        _, block, size = GGML_TYPES[self.ggml_type]
        n = 1
        for d in self.shape:
            n *= d
        return n // block * size


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, str]
    n_tensors: int
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int | None = None  # start of the tensor data (None when tensor infos were not read)
    data_size: int | None = None    # bytes of tensor data the header announces
    file_size: int = 0
    path: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        """``{architecture}.{suffix}``, e.g. ``arch_value("context_length")``."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    @property
    def context_length(self) -> int | None:
        v = self.arch_value("context_length")
        return int(v) if isinstance(v, int) else None

    @property
    def block_count(self) -> int | None:
        v = self.arch_value("block_count")
        return int(v) if isinstance(v, int) else None

    @property
    def truncated(self) -> bool:
        """True when the file is shorter than the tensor data its header announces."""
        if self.data_offset is None or self.data_size is None:
            return False
        return self.data_offset + self.data_size > self.file_size


Source = Union[str, os.PathLike, bytes, bytearray, memoryview]


_U64 = struct.Struct("<Q")


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise GGUFError(f"truncated or corrupt header at byte {self.pos}: {what} needs {n} bytes, "
                            f"{self.size - self.pos} left in the file")

    def unpack(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.unpack("I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("Q", 8, what)

    def raw_string(self, what: str, limit: int = MAX_STRING_BYTES) -> bytes:
        n = self.u64(f"the length of {what}")
        if n > limit:
            raise GGUFError(f"{what} at byte {self.pos - 8} claims {n} bytes (limit {limit}): corrupt header")
        self.need(n, what)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def skip_strings(self, count: int, what: str) -> None:
        """Jump over ``count`` length-prefixed strings without building them."""
        buf, pos, size, unpack_from = self.buf, self.pos, self.size, _U64.unpack_from
        try:
            for i in range(count):
                n = unpack_from(buf, pos)[0]
                pos += 8 + n
                if pos > size:
                    self.pos = pos - n
                    raise GGUFError(f"truncated or corrupt header at byte {pos - n}: {what}[{i}] claims {n} "
                                    f"bytes, {size - pos + n} left in the file")
        except struct.error:
            self.pos = pos
            self.need(8, f"{what}[{i}]")
            raise
        self.pos = pos


def _read_value(cur: _Cursor, vtype: int, key: str, max_array_items: int) -> Any:
    if vtype in _SCALAR:
        _, code, size = _SCALAR[vtype]
        v = cur.unpack(code, size, f"the value of {key!r}")
        return bool(v) if vtype == T_BOOL else v
    if vtype == T_STRING:
        return cur.raw_string(f"the value of {key!r}").decode("utf-8", errors="replace")
    if vtype == T_ARRAY:
        item_type = cur.u32(f"the item type of array {key!r}")
        count = cur.u64(f"the length of array {key!r}")
        if item_type == T_ARRAY:
            raise GGUFError(f"key {key!r} is an array of arrays, which GGUF does not allow")
        if item_type not in _SCALAR and item_type != T_STRING:
            raise GGUFError(f"key {key!r} is an array of unknown GGUF type {item_type}")
        if count > MAX_ARRAY_ELEMENTS:
            raise GGUFError(f"array {key!r} claims {count} elements (limit {MAX_ARRAY_ELEMENTS}): corrupt header")
        item_size = _SCALAR[item_type][2] if item_type in _SCALAR else 8  # a string needs >= its 8-byte length
        cur.need(count * item_size, f"array {key!r} of {count} {TYPE_NAMES[item_type]}")
        if item_type == T_STRING:
            if count > max_array_items:
                cur.skip_strings(count, key)
                return SkippedArray("string", count)
            return [cur.raw_string(f"{key}[{i}]").decode("utf-8", errors="replace") for i in range(count)]
        _, code, size = _SCALAR[item_type]
        if count > max_array_items:
            cur.pos += count * size
            return SkippedArray(TYPE_NAMES[item_type], count)
        values = list(struct.unpack_from(f"<{count}{code}", cur.buf, cur.pos))
        cur.pos += count * size
        return [bool(v) for v in values] if item_type == T_BOOL else values
    raise GGUFError(f"key {key!r} has unknown GGUF value type {vtype}")


def _parse(buf: Any, size: int, *, tensors: bool, max_array_items: int) -> GGUFHeader:
    cur = _Cursor(buf, size)
    version, n_tensors, n_kv = _read_preamble(cur, buf, size)
    metadata, value_types = _read_metadata(cur, buf, n_kv, max_array_items)
    alignment = _alignment(metadata, value_types)
    header = GGUFHeader(version=version, metadata=metadata, value_types=value_types, n_tensors=n_tensors,
                        alignment=alignment, file_size=size)
    if not tensors:
        return header
    infos, expected = _read_tensor_infos(cur, buf, n_tensors, alignment)
    header.tensors = infos
    header.data_offset = -(-cur.pos // alignment) * alignment if n_tensors else cur.pos
    header.data_size = expected
    return header


def _read_preamble(cur: "_Cursor", buf: Any, size: int) -> tuple[int, int, int]:
    """The magic, version, tensor count and metadata key count, each checked."""
    if size < 4:
        raise GGUFError(f"not a GGUF file: {size} bytes, too short for the magic")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file: the magic is {magic!r}, expected {GGUF_MAGIC!r}")
    cur.pos = 4
    version = cur.u32("the version")
    if version & 0xFFFF == 0 and version:
        raise GGUFError(f"GGUF version field {version:#x} looks byte-swapped: a big-endian GGUF file, "
                        "which llama.cpp on this little-endian machine cannot load; use a little-endian conversion")
    if version == 1:
        raise GGUFError("GGUF v1 is no longer supported by llama.cpp; convert the model again with a current llama.cpp")
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise GGUFError(f"GGUF version {version} is not supported (supported: {supported})")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the metadata key count")
    # every key/value needs at least 8 (key length) + 1 (key) + 4 (type) + 1 (value) bytes,
    # every tensor info at least 8 + 1 + 4 + 8 + 4 + 8.
    if n_kv > (size - cur.pos) // 14:
        raise GGUFError(f"the header claims {n_kv} metadata keys, more than a {size}-byte file can hold: "
                        "corrupt header")
    if n_tensors > (size - cur.pos) // 33:
        raise GGUFError(f"the header claims {n_tensors} tensors, more than a {size}-byte file can hold: corrupt header")
    return version, n_tensors, n_kv


def _read_metadata(cur: "_Cursor", buf: Any, n_kv: int,
                   max_array_items: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``n_kv`` metadata keys and values, and each value's GGUF type name."""
    metadata: dict[str, Any] = {}
    value_types: dict[str, str] = {}
    for i in range(n_kv):
        raw_key = cur.raw_string(f"metadata key #{i}", limit=65535)
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"metadata key #{i} is not valid UTF-8 ({exc}): corrupt header") from exc
        if not key:
            raise GGUFError(f"metadata key #{i} is empty: corrupt header")
        if key in metadata:
            raise GGUFError(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"the value type of {key!r}")
        start = cur.pos
        metadata[key] = _read_value(cur, vtype, key, max_array_items)
        if vtype == T_ARRAY:
            item = struct.unpack_from("<I", buf, start)[0]
            value_types[key] = f"array[{TYPE_NAMES[item]}]"
        else:
            value_types[key] = TYPE_NAMES[vtype]
    return metadata, value_types


def _alignment(metadata: dict[str, Any], value_types: dict[str, str]) -> int:
    """The data alignment: ``general.alignment`` (a power-of-2 uint32) or the default."""
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    if value_types["general.alignment"] != "uint32":
        raise GGUFError(f"general.alignment must be a uint32, not {value_types['general.alignment']}")
    alignment = metadata["general.alignment"]
    if alignment == 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment={alignment} is not a power of 2")
    return alignment


def _read_tensor_infos(cur: "_Cursor", buf: Any, n_tensors: int, alignment: int) -> tuple[list[TensorInfo], int]:
    """The tensor infos, each checked, and the bytes of tensor data they lay out."""
    infos: list[TensorInfo] = []
    names: set[str] = set()
    expected = 0
    for i in range(n_tensors):
        raw = cur.raw_string(f"the name of tensor #{i}", limit=GGML_MAX_NAME - 1)
        name = raw.decode("utf-8", errors="replace")
        if name in names:
            raise GGUFError(f"duplicate tensor name {name!r}")
        names.add(name)
        shape = _read_shape(cur, buf, name)
        ggml_type = cur.unpack("i", 4, f"the type of tensor {name!r}")
        if ggml_type not in GGML_TYPES:
            raise GGUFError(f"tensor {name!r} has ggml type {ggml_type}, unknown to llama.cpp 0.3.36")
        _, block, _ = GGML_TYPES[ggml_type]
        if shape and shape[0] % block:
            raise GGUFError(f"tensor {name!r}: {shape[0]} elements per row is not a multiple of the "
                            f"{GGML_TYPES[ggml_type][0]} block size {block}")
        offset = cur.u64(f"the data offset of tensor {name!r}")
        info = TensorInfo(name, tuple(shape), ggml_type, offset)
        if offset != expected:
            raise GGUFError(f"tensor {name!r} has data offset {offset}, expected {expected}: corrupt header")
        expected += -(-info.nbytes // alignment) * alignment
        infos.append(info)
    return infos, expected


def _read_shape(cur: "_Cursor", buf: Any, name: str) -> tuple[int, ...]:
    """A tensor's dimensions: at most GGML_MAX_DIMS, none negative, a product below 2**63."""
    n_dims = cur.u32(f"the dimension count of tensor {name!r}")
    if n_dims > GGML_MAX_DIMS:
        raise GGUFError(f"tensor {name!r} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
    cur.need(8 * n_dims, f"the shape of tensor {name!r}")
    shape = struct.unpack_from(f"<{n_dims}q", buf, cur.pos)
    cur.pos += 8 * n_dims
    n_elem = 1
    for d in shape:
        if d < 0:
            raise GGUFError(f"tensor {name!r} has a negative dimension {shape}")
        n_elem *= d
    if n_elem >= 2**63:
        raise GGUFError(f"tensor {name!r} of shape {shape} has too many elements")
    return shape


def read_gguf(source: Source, *, tensors: bool = True, max_array_items: int = 1024) -> GGUFHeader:
    """Parse the header of a GGUF file (a path) or of a GGUF image in memory (bytes).

    Raises :class:`GGUFError` on anything malformed, :class:`OSError` when the file
    cannot be opened.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _parse(source, len(source), tensors=tensors, max_array_items=max_array_items)
    path = Path(source)
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise GGUFError(f"{path} is empty")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # not mappable (pipe, special file system): read the header region only
            data = f.read(min(size, 512 * 1024 * 1024))
            header = _parse(data, len(data), tensors=tensors, max_array_items=max_array_items)
        else:
            try:
                header = _parse(mm, size, tensors=tensors, max_array_items=max_array_items)
            finally:
                mm.close()
    header.file_size = size
    header.path = str(path)
    return header


@dataclass(frozen=True)
class KVGeometry:
    n_layer: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer
    head_dim_k: int
    head_dim_v: int

    def bytes_per_token(self, k_bytes: float = 2.0, v_bytes: float = 2.0) -> int:
        return int(round(sum(self.n_head_kv) * (self.head_dim_k * k_bytes + self.head_dim_v * v_bytes)))


def _per_layer(value: Any, n_layer: int, what: str) -> tuple[int, ...]:
    if isinstance(value, list):
        if len(value) != n_layer:
            raise GGUFError(f"{what} has {len(value)} entries for {n_layer} layers")
        return tuple(int(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return (int(value),) * n_layer
    raise GGUFError(f"{what} is missing or not an integer (got {value!r})")


def kv_geometry(header: GGUFHeader) -> KVGeometry:
    """Layer count, KV heads and head dimensions from the metadata (llama.cpp's defaults:
    KV heads = heads, head dims = embedding_length / head_count)."""
    arch = header.architecture
    if not arch:
        raise GGUFError("general.architecture is missing")
    n_layer = header.arch_value("block_count")
    if not isinstance(n_layer, int) or n_layer <= 0:
        raise GGUFError(f"{arch}.block_count is missing or invalid ({n_layer!r})")
    heads = _per_layer(header.arch_value("attention.head_count"), n_layer, f"{arch}.attention.head_count")
    n_head = max(heads)
    kv_raw = header.arch_value("attention.head_count_kv")
    n_head_kv = heads if kv_raw is None else _per_layer(kv_raw, n_layer, f"{arch}.attention.head_count_kv")
    n_embd = header.arch_value("embedding_length")
    default_dim = n_embd // n_head if isinstance(n_embd, int) and n_head > 0 else None

    def dim(key: str) -> int:
        v = header.arch_value(key)
        if isinstance(v, int) and v > 0:
            return v
        if default_dim:
            return default_dim
        raise GGUFError(f"{arch}.{key} is missing and cannot be derived (no embedding_length / head_count)")

    return KVGeometry(n_layer, n_head, n_head_kv, dim("attention.key_length"), dim("attention.value_length"))


def kv_bytes_per_token(header: GGUFHeader, type_k: str = "f16", type_v: str = "f16") -> int:
    """KV-cache bytes per token for cache types ``type_k``/``type_v`` (f16 = 2 bytes)."""
    try:
        kb, vb = KV_TYPE_BYTES[type_k], KV_TYPE_BYTES[type_v]
    except KeyError as exc:
        raise GGUFError(f"unknown KV cache type {exc.args[0]!r}; known: {', '.join(KV_TYPE_BYTES)}") from None
    return kv_geometry(header).bytes_per_token(kb, vb)
