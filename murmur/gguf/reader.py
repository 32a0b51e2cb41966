"""Reading a GGUF file (llama.cpp's format) within bounds: its metadata, its tensor table, and tensors
dequantized to float32.

A GGUF file is user input. Every count, length, shape and offset in its header is checked against the
file's size before anything is allocated for it, so a file of a few bytes cannot claim a billion
metadata items or a tensor bigger than itself. The `gguf` package's `GGUFReader` trusts its header
(an array claiming 2**40 items past the end of the file loops on empty reads, one numpy view per item)
and spends seconds on a 49k-token vocabulary, so the header is walked here, once; the `gguf` package
supplies the format's constants and the dequantization of every supported type.

    file = GGUFFile("model.gguf")
    file.metadata["general.architecture"]      # "llama"
    file.tensors["blk.0.attn_q.weight"]         # TensorInfo(name, shape (rows, cols), type, offset, nbytes)
    weight = file.tensor("blk.0.attn_q.weight")  # float32 torch tensor, shape (rows, cols)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from murmur.errors import MurmurError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 counted in 32 bits; no file in use still has it
DEFAULT_ALIGNMENT = 32

# Limits far above any real model (a 405B Llama has ~1,100 tensors, ~40 metadata keys, ~530k array items
# in its vocabulary): what they bound is the work and memory a hostile header can ask for.
MAX_METADATA_KEYS = 4096
MAX_TENSORS = 65536
MAX_ARRAY_ITEMS = 4_000_000  # all arrays of the file together
MAX_STRING_BYTES = 1 << 20  # one key, one token, one chat template
MAX_DIMS = 4

# Metadata value types: fixed-size scalars as struct formats; 8 is a string, 9 an array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


def supported_types() -> dict[int, str]:
    """The ggml tensor types Murmur dequantizes, by id: floats, the legacy quants and the K-quants."""
    from gguf import GGMLQuantizationType as Q

    return {t.value: t.name for t in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                                       Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: (rows, cols) for a matrix; GGUF lists dimensions the other way round
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return supported_types().get(self.ggml_type) or _type_name(self.ggml_type)


class GGUFFile:
    """The metadata and tensor table of a GGUF file, read and checked; tensors are read on request."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._data = np.memmap(self.path, mode="r") if self.path.stat().st_size else np.zeros(0, np.uint8)
        except (OSError, ValueError) as err:
            raise MurmurError(f"{self.path} cannot be read: {err}") from None
        self.size = len(self._data)
        self._buffer = memoryview(self._data)
        self._pos = 0
        self._array_items = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._read_header()
        except _Truncated as err:
            raise MurmurError(f"{self.path} is not a valid GGUF file: it ends inside its header ({err}); "
                              "the file is truncated or is not GGUF") from None

    # ---- the header -----------------------------------------------------------------------------

    def _fail(self, what: str) -> MurmurError:
        return MurmurError(f"{self.path} is not a usable GGUF file: {what}")

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or self._pos + n > self.size:
            raise _Truncated(f"{what} needs {n} bytes at offset {self._pos}, the file has {self.size}")
        out = self._buffer[self._pos:self._pos + n]
        self._pos += n
        return out

    def _scalar(self, kind: int, what: str) -> Any:
        fmt = _SCALAR[kind]
        return struct.unpack(fmt, self._take(struct.calcsize(fmt), what))[0]

    def _string(self, what: str) -> str:
        length = self._scalar(10, what)
        if length > MAX_STRING_BYTES:
            raise self._fail(f"{what} claims a string of {length:,} bytes (at most {MAX_STRING_BYTES:,} allowed)")
        raw = bytes(self._take(length, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} is not valid UTF-8") from None

    def _read_header(self) -> None:
        if bytes(self._take(4, "the magic number")) != MAGIC:
            raise self._fail("it does not start with the GGUF magic bytes; pass a .gguf model file")
        version = self._scalar(4, "the version")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = " (a big-endian file; convert it on a little-endian machine)" if swapped in VERSIONS else ""
            raise self._fail(f"GGUF version {version} is not supported{hint}; supported: {VERSIONS}")
        tensor_count = self._scalar(10, "the tensor count")
        kv_count = self._scalar(10, "the metadata count")
        # Each key takes at least 12 bytes, each tensor entry at least 28: no count may exceed what the file holds.
        if kv_count > MAX_METADATA_KEYS or kv_count * 12 > self.size:
            raise self._fail(f"it claims {kv_count:,} metadata keys (at most {MAX_METADATA_KEYS:,}, and no more "
                             "than its size allows)")
        if tensor_count > MAX_TENSORS or tensor_count * 28 > self.size:
            raise self._fail(f"it claims {tensor_count:,} tensors (at most {MAX_TENSORS:,}, and no more than its "
                             "size allows)")
        for _ in range(kv_count):
            key = self._string("a metadata key")
            if key in self.metadata:
                raise self._fail(f"metadata key {key!r:.80} appears twice")
            self.metadata[key] = self._value(self._scalar(4, f"the type of {key}"), key)
        table = [self._tensor_entry() for _ in range(tensor_count)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
            raise self._fail(f"general.alignment is {alignment!r:.40}; expected a power of two")
        data_start = -(-self._pos // alignment) * alignment
        for name, dims, kind, offset in table:
            self._add_tensor(name, dims, kind, offset, data_start, alignment)

    def _value(self, kind: int, key: str) -> Any:
        if kind == 6:  # float32: the shortest decimal that is this float32 (1e-06, not 9.99999997e-07)
            return float(str(np.float32(self._scalar(kind, key))))
        if kind in _SCALAR:
            return self._scalar(kind, key)
        if kind == _STRING:
            return self._string(key)
        if kind != _ARRAY:
            raise self._fail(f"metadata key {key!r:.80} has unknown value type {kind}")
        item_kind = self._scalar(4, f"the item type of {key}")
        count = self._scalar(10, f"the length of {key}")
        self._array_items += count
        if self._array_items > MAX_ARRAY_ITEMS:
            raise self._fail(f"metadata arrays hold more than {MAX_ARRAY_ITEMS:,} items in all ({key} claims "
                             f"{count:,})")
        if item_kind in _SCALAR:  # read at once, after checking it fits in the file
            width = struct.calcsize(_SCALAR[item_kind])
            values = np.frombuffer(self._take(count * width, key), dtype=np.dtype(_NUMPY[item_kind]).newbyteorder("<"))
            return values.tolist()
        if item_kind == _STRING:
            if count * 8 > self.size - self._pos:
                raise _Truncated(f"{key} claims {count:,} strings")
            return [self._string(f"item {i} of {key}") for i in range(count)]
        raise self._fail(f"metadata key {key!r:.80} is an array of type {item_kind}; Murmur reads arrays of "
                         "numbers and strings only")

    def _tensor_entry(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string("a tensor name")
        n_dims = self._scalar(4, f"the dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(f"tensor {name!r:.80} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = tuple(self._scalar(10, f"a dimension of {name}") for _ in range(n_dims))
        kind = self._scalar(4, f"the type of {name}")
        offset = self._scalar(10, f"the offset of {name}")
        return name, dims, kind, offset

    def _add_tensor(self, name: str, dims: tuple[int, ...], kind: int, offset: int, data_start: int,
                    alignment: int) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if name in self.tensors:
            raise self._fail(f"tensor {name!r:.80} appears twice")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise self._fail(f"tensor {name!r:.80} has unknown type {kind}") from None
        if any(d == 0 for d in dims) or dims[0] % block:
            raise self._fail(f"tensor {name!r:.80} has shape {list(dims)}; its rows must be whole blocks of {block}")
        elements = math.prod(dims)
        nbytes = elements // block * type_size
        start = data_start + offset
        if offset % alignment or start + nbytes > self.size:
            raise self._fail(f"tensor {name!r:.80} ({list(dims)} {_type_name(kind)}, {nbytes:,} bytes at offset "
                             f"{offset:,}) lies outside the file ({self.size:,} bytes): truncated or corrupt")
        self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), kind, start, nbytes)

    # ---- tensors ---------------------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor (a read-only view of the file)."""
        info = self.tensors[name]
        return self._data[info.offset:info.offset + info.nbytes]

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor dequantized to float32, in torch's shape order, in memory of its own."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        if info.ggml_type not in supported_types():
            raise MurmurError(f"{self.path}: tensor {name} is stored as {info.type_name}, which Murmur does not "
                              f"dequantize; supported: {', '.join(supported_types().values())}")
        qtype = GGMLQuantizationType(info.ggml_type)
        raw = self.raw(name)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            values = dequantize(raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16), qtype)
        else:
            rows = math.prod(info.shape[:-1])
            values = dequantize(raw.reshape(rows, -1), qtype)
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(info.shape))


class _Truncated(Exception):
    """The header ends before what it describes (turned into a MurmurError with the file's name)."""


def _type_name(kind: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(kind).name
    except ValueError:
        return f"type {kind}"
