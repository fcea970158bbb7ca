"""Safetensors reading and writing with numpy only.

A safetensors file is an 8-byte little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} and the raw data.
numpy has no bfloat16, so bf16 arrays are held as uint16 bit patterns and every array travels
with a dtype name ("float32", "float16", "bfloat16", "int32", ...). FP8 arrays are held as uint8 bit
patterns. Packed int4 ("int4": signed values two per byte along the last dim, the even index in the low
nibble) is stored as uint8 bytes of shape [..., K / 2] and named in the metadata key "packed_int4" (a JSON
list), so the safetensors library reads such a file (as bytes) and rtllm restores the logical shape.
"""

import json
import os
import struct

import numpy as np

# dtype name -> (safetensors name, numpy storage type)
SAFETENSORS_DTYPES = {
    "float32": ("F32", np.float32),
    "float16": ("F16", np.float16),
    "bfloat16": ("BF16", np.uint16),
    "int32": ("I32", np.int32),
    "int64": ("I64", np.int64),
    "int8": ("I8", np.int8),
    "uint8": ("U8", np.uint8),
    "bool": ("BOOL", np.bool_),
    "float8_e4m3": ("F8_E4M3", np.uint8),
    "float8_e5m2": ("F8_E5M2", np.uint8),
    "int4": ("U8", np.uint8),  # packed; see the module docstring
}
_FROM_SAFETENSORS = {st: name for name, (st, _) in SAFETENSORS_DTYPES.items() if name != "int4"}
PACKED_INT4_KEY = "packed_int4"


def pack_int4(values: np.ndarray) -> np.ndarray:
    """int values in [-8, 7], shape [..., K] with K even -> uint8 [..., K / 2] (even index: low nibble)."""
    values = np.asarray(values)
    if values.shape[-1] % 2 or values.min(initial=0) < -8 or values.max(initial=0) > 7:
        raise ValueError(f"int4 packing needs values in [-8, 7] and an even last dim, got shape {values.shape}")
    nibbles = (values.astype(np.int16) & 0xF).astype(np.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., K / 2] -> int8 [..., K], the inverse of pack_int4."""
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int8)
    return np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.int8)


def stored_shape(dtype: str, shape) -> tuple:
    """The shape in the file: packed int4 halves the last dim."""
    shape = tuple(shape)
    if dtype != "int4":
        return shape
    if not shape or shape[-1] % 2:
        raise ValueError(f"an int4 tensor needs an even last dim, got shape {list(shape)}")
    return (*shape[:-1], shape[-1] // 2)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_MAX_HEADER_BYTES = 100 << 20  # the safetensors limit; anything larger is a corrupt length field


def storage_type(dtype: str) -> type:
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
    return SAFETENSORS_DTYPES[dtype][1]


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact: a bf16 value is the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even; NaNs stay (quiet) NaNs."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # uint32 arithmetic wraps only for NaNs
    nan_bits = (bits >> 16) | 0x0040
    return np.where(np.isnan(x), nan_bits, rounded).astype(np.uint16)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype not in FLOAT_DTYPES:  # FP8 bit patterns are uint8 codes, not values
        raise ValueError(f"cannot read {dtype} as float32 values: only {', '.join(FLOAT_DTYPES)} convert")
    if dtype == "bfloat16":
        return bf16_to_float32(array)
    return np.asarray(array, dtype=np.float32)


def cast(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Converts between float dtypes; each narrowing rounds once (to nearest even)."""
    if src == dst:
        return array
    if src not in FLOAT_DTYPES or dst not in FLOAT_DTYPES:
        raise ValueError(f"cannot cast {src} to {dst}: only {', '.join(FLOAT_DTYPES)} convert")
    x = to_float32(array, src)  # exact for every float dtype
    if dst == "bfloat16":
        return float32_to_bf16(x)
    with np.errstate(over="ignore"):  # out of float16 range -> inf, as IEEE rounding says
        return x.astype(SAFETENSORS_DTYPES[dst][1])


class SafetensorsFile:
    """A lazily read safetensors file: the header is parsed on open, data is memory-mapped on use."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            file_size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise ValueError(f"truncated safetensors file {self.path}: {file_size} bytes, no header")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
                    raise ValueError(f"truncated or corrupt safetensors file {self.path}: header length "
                                     f"{header_len} but the file has {file_size} bytes")
                header_bytes = f.read(header_len)
        except OSError as e:
            raise ValueError(f"cannot read safetensors file {self.path}: {e}") from e
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"corrupt safetensors header in {self.path}: {e}") from e
        if not isinstance(header, dict):
            raise ValueError(f"corrupt safetensors header in {self.path}: not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_size = file_size - self._data_start
        self.entries = {}  # name -> (dtype, shape, begin, end)
        for name, entry in header.items():
            self.entries[name] = self._parse_entry(name, entry, data_size)
        for name in self._packed_int4_names():
            dtype, shape, begin, end = self.entries[name]
            if dtype != "uint8" or not shape:
                raise ValueError(f"corrupt safetensors file {self.path}: packed int4 tensor {name!r} is "
                                 f"stored as {dtype}{list(shape)}, not uint8 bytes")
            self.entries[name] = ("int4", (*shape[:-1], 2 * shape[-1]), begin, end)
        self._mmap = None

    def _parse_entry(self, name, entry, data_size):
        def fail(why):
            raise ValueError(f"corrupt safetensors file {self.path}: tensor {name!r}: {why}")

        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            fail("entry needs dtype, shape and data_offsets")
        dtype = _FROM_SAFETENSORS.get(entry["dtype"])
        if dtype is None:
            fail(f"unsupported dtype {entry['dtype']!r}")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            fail(f"invalid shape {shape!r}")
        offsets = entry["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            fail(f"invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            fail(f"data_offsets end {end} is past the data size {data_size} (truncated file?)")
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[dtype][1]).itemsize
        if end - begin != expected:
            fail(f"byte range of {end - begin} bytes does not match shape {shape} and dtype {dtype} "
                 f"({expected} bytes)")
        return dtype, tuple(shape), begin, end

    def _packed_int4_names(self) -> list:
        text = self.metadata.get(PACKED_INT4_KEY)
        if text is None:
            return []
        try:
            names = json.loads(text)
        except json.JSONDecodeError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) and n in self.entries for n in names):
            raise ValueError(f"corrupt safetensors file {self.path}: metadata {PACKED_INT4_KEY}={text!r} must "
                             "be a JSON list of the file's tensor names")
        return names

    def keys(self):
        return self.entries.keys()

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """A read-only view into the mapped file (bf16 as uint16, FP8 as uint8, int4 packed: uint8
        [..., K / 2])."""
        dtype, shape, begin, end = self.entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        return raw.view(SAFETENSORS_DTYPES[dtype][1]).reshape(stored_shape(dtype, shape))


def write_safetensors(path: str, tensors, metadata: dict | None = None) -> None:
    """Streams tensors to `path`.

    `tensors` is a list of (name, dtype, shape, produce) where produce() returns the array; arrays are
    produced and written one at a time, so at most one is in memory. The header comes first, so every
    dtype and shape must be known before any data. An int4 tensor's shape is its logical one; produce()
    returns it packed (pack_int4).
    """
    header = {}
    offset = 0
    packed_int4 = []
    for name, dtype, shape, _ in tensors:
        file_shape = stored_shape(dtype, shape)
        num_bytes = int(np.prod(file_shape, dtype=np.int64)) * np.dtype(storage_type(dtype)).itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype][0], "shape": list(file_shape),
                        "data_offsets": [offset, offset + num_bytes]}
        offset += num_bytes
        if dtype == "int4":
            packed_int4.append(name)
    metadata = dict(metadata or {})
    if packed_int4:
        metadata[PACKED_INT4_KEY] = json.dumps(packed_int4)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, dtype, shape, produce in tensors:
            array = np.asarray(produce())
            array = array if array.flags.c_contiguous else array.copy()  # (ascontiguousarray makes 0-d 1-d)
            if array.dtype != storage_type(dtype) or tuple(array.shape) != stored_shape(dtype, shape):
                raise ValueError(f"tensor {name!r} produced {array.dtype}{list(array.shape)}, "
                                 f"declared {dtype}{list(shape)}")
            f.write(array.reshape(-1).view(np.uint8).data)
