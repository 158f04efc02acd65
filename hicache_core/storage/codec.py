"""Page codecs for L3 (``"codec"`` in the storage extra config): fewer bytes to and from the store.

A stored page becomes a *blob*: a 16-byte header, then the method's payload. Header (little endian): magic
``HCC1`` (4), method (u8), the pool dtype's item size (u8), reserved (u16), the page's raw length (u32), the length
of the payload's first part (u32). Methods:

* ``raw`` (0): the page's bytes as they are. Written when the codec does not pay (:mod:`codec_storage`'s cost
  rule) or cannot shrink the page; every reader of a codec namespace reads it.
* ``zstd`` (1), lossless: KV values are floats whose top byte (sign and exponent) repeats a few values, while
  the low bytes are noise to a compressor. So the page is split into byte planes (pure integer shifts, several
  GB/s): the top plane is zstd-compressed (part one), the rest is stored as it is (part two). bfloat16 KV of a
  real or random model shrinks by ~1.4x, at twice the speed of compressing the whole page for the same ratio.
* ``fp8`` (2), lossy: each run of 128 values is quantized to float8 e4m3 with its own float32 scale (the run's
  largest magnitude over 448). bfloat16 pages shrink ~1.9x, float32 ~3.9x; a value comes back within e4m3's
  relative step (1/16) of its run's scale. Only for bfloat16, float16 and float32 pools, and only when asked.

The codec is in the storage namespace (:class:`~hicache_core.keys.StorageNamespace`): pages written under one
codec are never read by a configuration with another (or none). Decoding checks every length it is given; a blob
that does not decode to exactly one page is a miss, never a page.
"""

from __future__ import annotations

import struct
from typing import Union

import numpy as np
import torch

from hicache_core.errors import ConfigError

MAGIC = b"HCC1"
HEADER = struct.Struct("<4sBBHII")
HEADER_BYTES = HEADER.size
RAW, ZSTD, FP8 = 0, 1, 2
METHODS = {"zstd": ZSTD, "fp8": FP8}
FP8_BLOCK = 128  # values per float32 scale
FP8_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_E4M3 = torch.float8_e4m3fn
_E4M3_MAX = float(torch.finfo(_E4M3).max)
_UINT = {2: np.uint16, 4: np.uint32}
# every e4m3 byte's value (its two NaN codes, which the encoder never writes, as 0)
_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(_E4M3).to(torch.float32).nan_to_num(0.0).numpy()

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]


def nbytes(parts: list[Buffer]) -> int:
    """The length of a blob's parts together."""
    return sum(p.nbytes if isinstance(p, np.ndarray) else len(p) for p in parts)


def join(parts: list[Buffer]) -> bytes:
    """A blob's parts as one bytes object."""
    return b"".join(p.data if isinstance(p, np.ndarray) else p for p in parts)


class CodecError(Exception):
    """A blob that is not a page of this codec and pool (wrong header, length or payload)."""


def zstd_module():
    """The zstandard package, or a ConfigError saying how to get it."""
    try:
        import zstandard
    except ImportError as e:
        raise ConfigError(
            '"codec": "zstd" in --hicache-storage-backend-extra-config needs the zstandard package: '
            "pip install 'hicache-core[codec]' (or pip install zstandard)"
        ) from e
    return zstandard


def namespace_name(codec: str) -> str:
    """What the namespace records for a codec: its name and, for fp8, the scale format."""
    return {"zstd": "zstd-planes", "fp8": f"fp8-e4m3-b{FP8_BLOCK}"}.get(codec, "")


def check_pool(codec: str, dtype: torch.dtype, kv_format: str, pool: str = "this pool") -> None:
    """Refuse a codec the pool's pages cannot take: fp8 only on bfloat16/float16/float32 KV (a pool of mixed or
    integer pages, an SGLang Mamba state slot, has the flat dtype uint8). ``pool`` names it in the message."""
    if codec == "fp8" and (dtype not in FP8_DTYPES or kv_format):
        raise ConfigError(
            f'"codec": "fp8" quantizes bfloat16, float16 or float32 KV; {pool} holds '
            f"{str(dtype).replace('torch.', '')}{' (' + kv_format + ')' if kv_format else ''} pages, which it "
            'cannot shrink without loss it was not asked for; use "codec": "zstd", or none'
        )
    if codec == "zstd":
        zstd_module()


class PageCodec:
    """Encodes and decodes the pages of one pool (its dtype) with one method."""

    def __init__(self, codec: str, dtype: torch.dtype, level: int = 1) -> None:
        self.name = codec
        self.method = METHODS[codec]
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.level = level
        if self.method == ZSTD:
            z = zstd_module()
            self._zc, self._zd = z.ZstdCompressor(level=level), z.ZstdDecompressor()

    # --- encode ----------------------------------------------------------------------------------------------------
    def raw(self, page: np.ndarray) -> list[Buffer]:
        return [HEADER.pack(MAGIC, RAW, self.itemsize, 0, page.size, page.size), page]

    def encode(self, page: np.ndarray) -> list[Buffer]:
        """The blob of one page (uint8, its raw bytes), as parts to write one after another; raw when the method
        would not make it smaller."""
        parts = self._zstd(page) if self.method == ZSTD else self._fp8(page)
        if nbytes(parts) >= page.size:
            return self.raw(page)
        return [HEADER.pack(MAGIC, self.method, self.itemsize, 0, page.size, nbytes(parts[:1])), *parts]

    def _zstd(self, page: np.ndarray) -> list[Buffer]:
        s = self.itemsize
        if s not in _UINT or page.size % s:
            return [self._zc.compress(page)]
        a = page.view(_UINT[s])
        top = (a >> (8 * (s - 1))).astype(np.uint8)
        rest = [a.astype(np.uint8)] if s == 2 else [(a >> 16).astype(np.uint8), a.astype(np.uint16)]
        return [self._zc.compress(top), *rest]

    def _fp8(self, page: np.ndarray) -> list[Buffer]:
        x = torch.from_numpy(page).view(self.dtype).to(torch.float32)
        n = x.numel()
        pad = (-n) % FP8_BLOCK
        blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, FP8_BLOCK)
        amax = blocks.abs().amax(1, keepdim=True)
        scale = torch.where(amax > 0, amax / _E4M3_MAX, torch.ones_like(amax))
        q = (blocks / scale).clamp(-_E4M3_MAX, _E4M3_MAX).to(_E4M3).view(-1)[:n]
        return [q.view(torch.uint8).numpy(), scale.view(-1).numpy()]

    # --- decode ----------------------------------------------------------------------------------------------------
    def decode(self, blob: Buffer, out: np.ndarray) -> None:
        """Decode ``blob`` into ``out`` (uint8, one page); raises :class:`CodecError` unless it is one page."""
        mv = memoryview(blob.data) if isinstance(blob, np.ndarray) else memoryview(blob).cast("B")
        if len(mv) < HEADER_BYTES:
            raise CodecError(f"{len(mv)} bytes, less than a codec header")
        magic, method, itemsize, _, raw_len, first = HEADER.unpack_from(mv)
        if magic != MAGIC:
            raise CodecError("not a hicache codec blob")
        if raw_len != out.size or itemsize != self.itemsize:
            raise CodecError(f"a page of {raw_len} bytes of {itemsize}-byte values; this pool's are {out.size}")
        body = mv[HEADER_BYTES:]
        if method == RAW:
            if len(body) != raw_len:
                raise CodecError(f"raw payload of {len(body)} bytes, expected {raw_len}")
            out[:] = np.frombuffer(body, np.uint8)
        elif method == ZSTD and self.method == ZSTD:
            self._unzstd(body, first, out)
        elif method == FP8 and self.method == FP8:
            self._unfp8(body, first, out)
        else:
            raise CodecError(f"method {method}, this codec reads {self.method} and raw")

    def _plane(self, data: memoryview, size: int) -> np.ndarray:
        try:
            plane = self._zd.decompress(data, max_output_size=size)
        except Exception as e:  # zstandard.ZstdError: the payload is not a frame
            raise CodecError(f"zstd: {e}") from None
        if len(plane) != size:
            raise CodecError(f"zstd plane of {len(plane)} bytes, expected {size}")
        return np.frombuffer(plane, np.uint8)

    def _unzstd(self, body: memoryview, first: int, out: np.ndarray) -> None:
        s, raw_len = self.itemsize, out.size
        if first > len(body):
            raise CodecError("first part longer than the payload")
        if s not in _UINT or raw_len % s:
            out[:] = self._plane(body, raw_len)
            return
        n = raw_len // s
        rest = body[first:]
        if len(rest) != n * (s - 1):
            raise CodecError(f"low planes of {len(rest)} bytes, expected {n * (s - 1)}")
        top = self._plane(body[:first], n)
        a = out.view(_UINT[s])
        if s == 2:
            np.left_shift(top, 8, out=a, dtype=np.uint16)
            np.bitwise_or(a, np.frombuffer(rest, np.uint8), out=a)
            return
        np.left_shift(top, 24, out=a, dtype=np.uint32)
        a |= np.left_shift(np.frombuffer(rest[:n], np.uint8), 16, dtype=np.uint32)
        a |= np.frombuffer(rest[n:], np.uint16)

    def _unfp8(self, body: memoryview, first: int, out: np.ndarray) -> None:
        n = out.size // self.itemsize
        blocks = -(-n // FP8_BLOCK)
        if first != n or len(body) != n + 4 * blocks:
            raise CodecError(f"fp8 payload of {len(body)} bytes, expected {n + 4 * blocks}")
        vals = np.take(_E4M3_VALUES, np.frombuffer(body[:n], np.uint8))  # a table: 3x torch's fp8 cast here
        scale = np.frombuffer(body[n:], np.float32)
        whole = n - n % FP8_BLOCK
        vals[:whole].reshape(-1, FP8_BLOCK).__imul__(scale[: whole // FP8_BLOCK, None])
        vals[whole:] *= scale[-1]
        if self.dtype == torch.float32:
            out.view(np.float32)[:] = vals
        elif self.dtype == torch.float16:
            out.view(np.float16)[:] = vals
        else:  # bfloat16: the top half of the float32, rounded to nearest even
            bits = vals.view(np.uint32)
            bits += 0x7FFF + ((bits >> 16) & 1)
            np.right_shift(bits, 16, out=out.view(np.uint16), casting="unsafe")
