"""Read and write the published BitMamba-2 C++ engine's `.bin` model file (pure numpy, no torch).

Layout (all little-endian, as the published engine writes it):

    header   5 x int32: magic 0x42495432, vocab, d_model, n_layers, n_heads
    fp32     int32 type=0, int32 ndim, ndim x int32 dims, float32 data
    ternary  int32 type=2, int32 rows, int32 cols, float32 scale (s = 1/mean|W|),
             rows*cols/4 bytes; code = w + 1 in {0,1,2}, 4 codes a byte c0|c1<<2|c2<<4|c3<<6,
             row-major along the input dimension

Records come in a fixed order (see `bin_layout`); expand 2 and d_conv 4 are implied, so
d_inner = 2*d_model, head_dim = d_inner / n_heads, in_proj rows = 2*d_inner + 3*n_heads.
Record names are our state_dict names (docs/DESIGN.md), so the converter maps them one to one.

    m = read_bin("model.bin")          # BinModel: header + ordered records
    m["layers.0.mixer.in_proj.weight"].codes   # int8 [rows, cols] in {-1, 0, 1}
    write_bin("copy.bin", m)           # byte-identical to the input
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.errors import CheckpointError

MAGIC = 0x42495432
TYPE_FP32 = 0
TYPE_TERNARY = 2
EXPAND = 2
D_CONV = 4


@dataclass(frozen=True)
class BinHeader:
    """The five header ints; derived sizes follow the engine's implied expand 2 / d_conv 4."""

    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    magic: int = MAGIC

    @property
    def d_inner(self) -> int:
        return EXPAND * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_inner // self.n_heads

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 3 * self.n_heads

    def check(self, where: str) -> None:
        """Raise CheckpointError (prefixed with `where`) if the sizes cannot describe a model."""
        for name in ("vocab", "d_model", "n_layers", "n_heads"):
            v = getattr(self, name)
            if v <= 0:
                raise CheckpointError(f"{where}: header {name} must be positive, found {v}")
        if self.d_inner % self.n_heads:
            raise CheckpointError(
                f"{where}: header d_inner = 2*d_model = {self.d_inner} is not divisible by n_heads = {self.n_heads}"
            )
        for name, cols in (("d_model", self.d_model), ("d_inner", self.d_inner)):
            if cols % 4:
                raise CheckpointError(
                    f"{where}: {name} = {cols} is not a multiple of 4 (ternary records pack 4 codes a byte)"
                )


@dataclass
class FpRecord:
    """A float32 tensor record (type 0)."""

    name: str
    data: np.ndarray  # float32, shape as stored


@dataclass
class TernaryRecord:
    """A ternary matrix record (type 2): codes in {-1,0,1} and the engine's scale s = 1/mean|W|."""

    name: str
    codes: np.ndarray  # int8 [rows, cols] (rows = out features, cols = in features)
    scale: np.float32  # s: effective weight = codes / s

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


Record = FpRecord | TernaryRecord


@dataclass
class BinModel:
    """A parsed `.bin` file: header plus records in file order (names = our parameter names)."""

    header: BinHeader
    records: list[Record] = field(default_factory=list)

    def __getitem__(self, name: str) -> Record:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def names(self) -> list[str]:
        return [r.name for r in self.records]


def bin_layout(h: BinHeader) -> list[tuple[str, int, tuple[int, ...]]]:
    """Expected records in file order: (our parameter name, record type, shape)."""
    return list(iter_layout(h))


def iter_layout(h: BinHeader) -> Iterator[tuple[str, int, tuple[int, ...]]]:
    """`bin_layout` lazily (a corrupt header with a huge n_layers fails at the first missing record)."""
    d, di, H, V = h.d_model, h.d_inner, h.n_heads, h.vocab
    yield ("embedding.weight", TYPE_FP32, (V, d))
    for i in range(h.n_layers):
        p = f"layers.{i}.mixer."
        yield from [
            (p + "in_proj.norm.weight", TYPE_FP32, (d,)),
            (p + "in_proj.weight", TYPE_TERNARY, (h.d_in_proj, d)),
            (p + "conv1d.weight", TYPE_FP32, (di, 1, D_CONV)),
            (p + "conv1d.bias", TYPE_FP32, (di,)),
            (p + "dt_bias", TYPE_FP32, (H,)),
            (p + "A_log", TYPE_FP32, (H,)),
            (p + "D", TYPE_FP32, (di,)),
            (p + "out_proj.norm.weight", TYPE_FP32, (di,)),
            (p + "out_proj.weight", TYPE_TERNARY, (d, di)),
        ]
    yield ("norm_f.weight", TYPE_FP32, (d,))
    yield ("lm_head.norm.weight", TYPE_FP32, (d,))
    yield ("lm_head.weight", TYPE_TERNARY, (V, d))


# ---------------------------------------------------------------------------------------------
# 2-bit packing (the .bin layout; same as model.bitlinear.pack_ternary)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """int8 [rows, cols] in {-1,0,1} -> uint8 [rows, cols//4], code = w+1, c0|c1<<2|c2<<4|c3<<6."""
    rows, cols = codes.shape
    if cols % 4:
        raise ValueError(f"cols = {cols} is not a multiple of 4")
    c = (codes.astype(np.int16) + 1).astype(np.uint8).reshape(rows, cols // 4, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, cols: int) -> np.ndarray:
    """uint8 [rows, cols//4] -> raw 2-bit codes uint8 [rows, cols] in {0,1,2,3} (3 is invalid)."""
    rows = packed.shape[0]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    c = (packed[..., None] >> shifts) & np.uint8(3)
    return c.reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# reading


class _Cursor:
    """Little-endian reader over a byte buffer that names the record on truncation."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path
        self.what = "header"

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CheckpointError(
                f"{self.path}: truncated in {self.what} at offset {self.pos}: need {n} bytes, "
                f"{len(self.buf) - self.pos} left (file size {len(self.buf)})"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def ints(self, n: int) -> tuple[int, ...]:
        return struct.unpack(f"<{n}i", self.take(4 * n))


def read_bin(path: str | Path) -> BinModel:
    """Parse a BitMamba-2 `.bin`; every record's type and shape is checked against the header.

    Raises CheckpointError naming the file and the problem (bad magic with the value found,
    record of the wrong type/shape by name, truncation with the record and offset, invalid
    code 3, trailing bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    data = path.read_bytes()
    cur = _Cursor(memoryview(data), path)
    if len(data) < 20:
        raise CheckpointError(f"{path}: truncated header: file has {len(data)} bytes, the header needs 20")
    magic, vocab, d_model, n_layers, n_heads = cur.ints(5)
    if magic & 0xFFFFFFFF != MAGIC:
        raise CheckpointError(
            f"{path}: bad magic 0x{magic & 0xFFFFFFFF:08x} (expected 0x{MAGIC:08x}); not a BitMamba-2 .bin file"
        )
    header = BinHeader(vocab=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    header.check(str(path))

    records: list[Record] = []
    for idx, (name, rtype, shape) in enumerate(iter_layout(header)):
        start = cur.pos
        cur.what = f"record {idx} ({name}) starting at offset {start}"
        (found,) = cur.ints(1)
        if found != rtype:
            kind = {TYPE_FP32: "fp32 (type 0)", TYPE_TERNARY: "ternary (type 2)"}[rtype]
            raise CheckpointError(
                f"{path}: record {idx} ({name}) at offset {start}: expected a {kind} record, found type {found}"
            )
        if rtype == TYPE_FP32:
            (ndim,) = cur.ints(1)
            if ndim != len(shape):
                raise CheckpointError(
                    f"{path}: record {idx} ({name}) at offset {start}: expected ndim {len(shape)} "
                    f"(shape {list(shape)}), found ndim {ndim}"
                )
            dims = cur.ints(ndim)
            if tuple(dims) != shape:
                raise CheckpointError(
                    f"{path}: record {idx} ({name}) at offset {start}: expected shape {list(shape)}, found {list(dims)}"
                )
            n = int(np.prod(shape))
            arr = np.frombuffer(cur.take(4 * n), dtype="<f4").astype(np.float32).reshape(shape)
            records.append(FpRecord(name, arr))
        else:
            rows, cols = cur.ints(2)
            if (rows, cols) != shape:
                raise CheckpointError(
                    f"{path}: record {idx} ({name}) at offset {start}: expected ternary shape "
                    f"{list(shape)}, found [{rows}, {cols}]"
                )
            if cols % 4:
                raise CheckpointError(f"{path}: record {idx} ({name}): cols = {cols} is not a multiple of 4")
            (scale,) = np.frombuffer(cur.take(4), dtype="<f4")
            packed = np.frombuffer(cur.take(rows * cols // 4), dtype=np.uint8).reshape(rows, cols // 4)
            raw = unpack_codes(packed, cols)
            if (raw == 3).any():
                r, c = np.argwhere(raw == 3)[0]
                raise CheckpointError(
                    f"{path}: record {idx} ({name}): invalid 2-bit code 3 at row {r}, col {c} (codes are 0, 1, 2)"
                )
            if not np.isfinite(scale) or scale <= 0:
                raise CheckpointError(f"{path}: record {idx} ({name}): scale must be positive and finite, found {scale}")
            records.append(TernaryRecord(name, raw.astype(np.int8) - 1, np.float32(scale)))
    if cur.pos != len(data):
        raise CheckpointError(
            f"{path}: {len(data) - cur.pos} trailing bytes after the last record (offset {cur.pos}, "
            f"file size {len(data)})"
        )
    return BinModel(header, records)


# ---------------------------------------------------------------------------------------------
# writing


def encode_bin(model: BinModel) -> bytes:
    """Serialize `model` (records must match `bin_layout(model.header)` in order, type and shape)."""
    h = model.header
    h.check("bin header")
    layout = bin_layout(h)
    if len(model.records) != len(layout):
        raise CheckpointError(f"bin model has {len(model.records)} records, the header implies {len(layout)}")
    parts = [struct.pack("<5i", MAGIC, h.vocab, h.d_model, h.n_layers, h.n_heads)]
    for rec, (name, rtype, shape) in zip(model.records, layout):
        if rec.name != name:
            raise CheckpointError(f"bin record order: expected {name}, got {rec.name}")
        if rtype == TYPE_FP32:
            if not isinstance(rec, FpRecord) or tuple(rec.data.shape) != shape:
                got = tuple(rec.data.shape) if isinstance(rec, FpRecord) else "a ternary record"
                raise CheckpointError(f"bin record {name}: expected fp32 {list(shape)}, got {got}")
            parts.append(struct.pack(f"<{2 + len(shape)}i", TYPE_FP32, len(shape), *shape))
            parts.append(np.ascontiguousarray(rec.data, dtype="<f4").tobytes())
        else:
            if not isinstance(rec, TernaryRecord) or rec.shape != shape:
                got = rec.shape if isinstance(rec, TernaryRecord) else "an fp32 record"
                raise CheckpointError(f"bin record {name}: expected ternary {list(shape)}, got {got}")
            codes = np.asarray(rec.codes)
            if codes.size and (codes.min() < -1 or codes.max() > 1):
                raise CheckpointError(f"bin record {name}: codes must be in {{-1, 0, 1}}")
            scale = np.float32(rec.scale)
            if not np.isfinite(scale) or scale <= 0:
                raise CheckpointError(f"bin record {name}: scale must be positive and finite, got {scale}")
            parts.append(struct.pack("<3i", TYPE_TERNARY, *shape))
            parts.append(np.array([scale], dtype="<f4").tobytes())
            parts.append(pack_codes(codes.astype(np.int8)).tobytes())
    return b"".join(parts)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bin(path: str | Path, model: BinModel) -> None:
    """Write `model` to `path` atomically (nothing is written if a record is invalid)."""
    atomic_write_bytes(path, encode_bin(model))
