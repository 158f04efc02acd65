"""The page envelope file-like backends share: a 64-byte header in front of each stored page.

Header (little endian): magic ``HICPAGE\\0`` (8), format version (u32), flags (u32), payload length (u64),
XXH3-64 of the payload (u64; ~20 GB/s, so integrity costs little next to the I/O), then 32 bytes: SHA-256 of
``"{scope}/{key}"`` -- scope being the storage namespace tag, so a page of another key, namespace or rank
never passes -- or, with a MAC key (flag 1), HMAC-SHA256 under that key of scope, key, length, checksum and
payload. The checksum catches accidents, not forgery: anyone who can write the store can write a page that passes
it. The MAC (~1 GB/s per core) makes pages from writers without the key misses. A reader serves a page only when
every field is what it expects and the checksum of the bytes it read agrees; :meth:`PageEnvelope.open` raises
:class:`EnvelopeError` (kind ``truncated``, ``foreign`` or ``corrupt``) otherwise, which the backend turns into a
miss.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from typing import Optional, Union

MAGIC = b"HICPAGE\0"
VERSION = 2
HEADER_BYTES = 64
_HEAD = struct.Struct("<8sIIQQ32s")
_CRC = struct.Struct("<Q")
assert _HEAD.size == HEADER_BYTES

Buffer = Union[bytes, bytearray, memoryview]


class EnvelopeError(Exception):
    """A stored page that is not the page asked for. ``kind``: truncated, foreign, corrupt, unsigned or forged."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def checksum(segments: Sequence[Buffer]) -> int:
    """XXH3-64 over the concatenation of ``segments``."""
    import xxhash  # imported here: the core imports without it (a GPU box running only the kernel checks)

    if len(segments) == 1:
        return xxhash.xxh3_64_intdigest(segments[0])
    h = xxhash.xxh3_64()
    for s in segments:
        h.update(s)
    return h.intdigest()


FLAG_MAC = 1


class PageEnvelope:
    """Seals and opens pages for one scope (a namespace tag; a rank's tag for per-rank files); with ``mac_key``,
    pages are signed and only signed pages open."""

    def __init__(self, scope: str, mac_key: Optional[bytes] = None) -> None:
        self.scope = scope
        self.mac_key = mac_key or None
        self._scoped = hashlib.sha256(f"{scope}/".encode())  # copied per key: the scope is hashed once

    def key_digest(self, key: str) -> bytes:
        """SHA-256 of ``"{scope}/{key}"``."""
        h = self._scoped.copy()
        h.update(key.encode())
        return h.digest()

    def _mac(self, key: str, payload_len: int, crc: int, segments: Sequence[Buffer]) -> bytes:
        assert self.mac_key is not None
        m = hmac.new(self.mac_key, f"{self.scope}/{key}".encode() + b"\0", "sha256")
        m.update(struct.pack("<QQ", payload_len, crc))
        for s in segments:
            m.update(s)
        return m.digest()

    def seal(self, key: str, segments: Sequence[Buffer]) -> bytes:
        """The header to write in front of ``segments``."""
        payload = sum(len(s) for s in segments)
        crc = checksum(segments)
        if self.mac_key:
            return _HEAD.pack(MAGIC, VERSION, FLAG_MAC, payload, crc, self._mac(key, payload, crc, segments))
        return _HEAD.pack(MAGIC, VERSION, 0, payload, crc, self.key_digest(key))

    def check(self, key: str, header: Buffer, segments: Sequence[Buffer], payload_len: int, n_read: int) -> None:
        """:meth:`open` for a reader that knows the payload's length and read one byte past it (``n_read`` may
        be ``HEADER_BYTES + payload_len + 1``: a file longer than its header says). The common case -- exactly
        the page asked for -- costs one comparison of the header's fixed fields and the checksum; anything else
        goes through :meth:`open` for its precise error."""
        if n_read == HEADER_BYTES + payload_len and not self.mac_key:
            want = _HEAD.pack(MAGIC, VERSION, 0, payload_len, 0, self.key_digest(key))
            if header[:24] == want[:24] and header[32:HEADER_BYTES] == want[32:]:
                if checksum(segments) == _CRC.unpack_from(header, 24)[0]:
                    return
                raise EnvelopeError("corrupt", "checksum mismatch")
        if n_read > HEADER_BYTES + payload_len:
            self.open(key, header, segments, HEADER_BYTES + payload_len)  # the header's own faults first
            raise EnvelopeError("foreign", "file is longer than its header says")
        self.open(key, header, segments, n_read)

    def open(self, key: str, header: Buffer, segments: Sequence[Buffer], n_read: Optional[int] = None) -> None:
        """Check a page read as ``header`` + ``segments`` (``n_read`` bytes in all, when the reader knows it)
        against ``key``; raises :class:`EnvelopeError` unless it is exactly the page written under ``key``."""
        expect = sum(len(s) for s in segments)
        if n_read is not None and n_read < HEADER_BYTES:
            raise EnvelopeError("truncated", f"{n_read} bytes, less than a header")
        magic, version, flags, payload_len, crc, digest = _HEAD.unpack_from(header)
        if magic != MAGIC:
            raise EnvelopeError("foreign", "not a hicache page")
        if version != VERSION:
            raise EnvelopeError("foreign", f"format version {version}, this reader knows {VERSION}")
        signed = bool(flags & FLAG_MAC)
        if signed != bool(self.mac_key):
            raise EnvelopeError(
                "unsigned" if self.mac_key else "foreign",
                "a page without a MAC, and this store requires one"
                if self.mac_key
                else "a page signed with a MAC key, and none is configured here",
            )
        if not signed and digest != self.key_digest(key):
            raise EnvelopeError("foreign", "the page of another key or namespace")
        if payload_len != expect:
            raise EnvelopeError("foreign", f"payload of {payload_len} bytes, expected {expect}")
        if n_read is not None and n_read < HEADER_BYTES + payload_len:
            raise EnvelopeError("truncated", f"{n_read - HEADER_BYTES} of {payload_len} payload bytes")
        if checksum(segments) != crc:
            raise EnvelopeError("corrupt", "checksum mismatch")
        if signed and not hmac.compare_digest(digest, self._mac(key, payload_len, crc, segments)):
            raise EnvelopeError("forged", "MAC mismatch: not written under this key by a holder of the MAC key")
