"""Which key lives in which slot of a rank's file.

:class:`RankMetadata` is the state for one rank (here: one namespace): free slots, and an LRU map from key to slot.
A key becomes visible only when its write is *confirmed*; when the file is full the least recently used key's
slot is reused. :class:`LocalMetadataClient` holds the state in process (one instance); :class:`HttpMetadataClient`
talks to ``hicache-hf3fs-metadata`` (several instances sharing one 3FS). Both have the same methods.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import urllib.parse
from collections import OrderedDict
from typing import Any, Optional

from hicache_core.errors import StorageError


class RankMetadata:
    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.lock = threading.Lock()
        self.free_pages = list(range(num_pages - 1, -1, -1))  # pop() hands out low slots first
        self.key_to_index: OrderedDict[str, int] = OrderedDict()
        self.reserved: set[int] = set()

    def reserve_and_allocate_page_indices(self, keys: list[str]) -> list[tuple[bool, int]]:
        """(already exists, slot) per key; new keys get a free slot, else the LRU key's (-1 if none)."""
        out = []
        with self.lock:
            for key in keys:
                if key in self.key_to_index:
                    self.key_to_index.move_to_end(key)
                    out.append((True, self.key_to_index[key]))
                    continue
                if self.free_pages:
                    slot = self.free_pages.pop()
                elif self.key_to_index:
                    _, slot = self.key_to_index.popitem(last=False)
                else:
                    out.append((False, -1))
                    continue
                self.reserved.add(slot)
                out.append((False, slot))
        return out

    def confirm_write(self, written: list[tuple[str, int]], release: list[int]) -> None:
        with self.lock:
            for key, slot in written:
                self.reserved.discard(slot)
                old = self.key_to_index.get(key)
                if old is not None and old != slot:  # two writers raced on one key: keep one slot
                    self.free_pages.append(old)
                self.key_to_index[key] = slot
                self.key_to_index.move_to_end(key)
            for slot in release:
                self.reserved.discard(slot)
                self.free_pages.append(slot)

    def get_page_indices(self, keys: list[str]) -> list[Optional[int]]:
        with self.lock:
            out = []
            for k in keys:
                slot = self.key_to_index.get(k)
                if slot is not None:
                    self.key_to_index.move_to_end(k)
                out.append(slot)
            return out

    def exists(self, keys: list[str]) -> list[bool]:
        with self.lock:
            return [k in self.key_to_index for k in keys]

    def delete_keys(self, keys: list[str]) -> None:
        with self.lock:
            for k in keys:
                slot = self.key_to_index.pop(k, None)
                if slot is not None:
                    self.free_pages.append(slot)

    def clear(self) -> None:
        with self.lock:
            self.key_to_index.clear()
            self.reserved.clear()
            self.free_pages = list(range(self.num_pages - 1, -1, -1))

    def to_json(self) -> dict:
        with self.lock:
            # reserved-but-unconfirmed slots go back to free: their writes never became visible
            return {"num_pages": self.num_pages, "free_pages": self.free_pages + sorted(self.reserved),
                    "key_to_index": list(self.key_to_index.items())}

    @classmethod
    def from_json(cls, d: dict) -> RankMetadata:
        m = cls(int(d["num_pages"]))
        m.free_pages = [int(x) for x in d["free_pages"]]
        m.key_to_index = OrderedDict((str(k), int(v)) for k, v in d["key_to_index"])
        return m


class MetadataStore:
    """All ranks' metadata, with optional persistence to a JSON file (written atomically)."""

    def __init__(self, persist_path: Optional[str] = None) -> None:
        self.ranks: dict[str, RankMetadata] = {}
        self.lock = threading.Lock()
        self.persist_path = persist_path
        if persist_path and os.path.exists(persist_path):
            with open(persist_path) as f:
                data = json.load(f)
            self.ranks = {r: RankMetadata.from_json(d) for r, d in data.items()}

    def initialize(self, rank: str, num_pages: int) -> None:
        with self.lock:
            m = self.ranks.get(rank)
            if m is None:
                self.ranks[rank] = RankMetadata(num_pages)
            elif m.num_pages != num_pages:
                raise ValueError(f"rank {rank!r} is initialized with {m.num_pages} pages, not {num_pages}: "
                                 "the same file is used with another page size or file size")

    def rank(self, rank: str) -> RankMetadata:
        m = self.ranks.get(rank)
        if m is None:
            raise KeyError(rank)
        return m

    def save(self) -> None:
        if not self.persist_path:
            return
        with self.lock:
            data = {r: m.to_json() for r, m in self.ranks.items()}
        tmp = f"{self.persist_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.persist_path)


class LocalMetadataClient:
    """The metadata service in process: for a single instance."""

    def __init__(self, store: Optional[MetadataStore] = None) -> None:
        self.store = store or MetadataStore()

    def initialize(self, rank: str, num_pages: int) -> None:
        self.store.initialize(rank, num_pages)

    def reserve_and_allocate_page_indices(self, rank: str, keys: list[str]) -> list[tuple[bool, int]]:
        return self.store.rank(rank).reserve_and_allocate_page_indices(keys)

    def confirm_write(self, rank: str, written: list[tuple[str, int]], release: list[int]) -> None:
        self.store.rank(rank).confirm_write(written, release)

    def get_page_indices(self, rank: str, keys: list[str]) -> list[Optional[int]]:
        return self.store.rank(rank).get_page_indices(keys)

    def exists(self, rank: str, keys: list[str]) -> list[bool]:
        return self.store.rank(rank).exists(keys)

    def delete_keys(self, rank: str, keys: list[str]) -> None:
        self.store.rank(rank).delete_keys(keys)

    def clear(self, rank: str) -> None:
        self.store.rank(rank).clear()

    def close(self) -> None:
        pass


class HttpMetadataClient:
    """Talks to ``hicache-hf3fs-metadata`` over HTTP (one keep-alive connection per thread, retries on reset)."""

    def __init__(self, base_url: str, timeout: float = 10.0, retries: int = 3) -> None:
        u = urllib.parse.urlparse(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"metadata_server_url {base_url!r} is not an http URL")
        self.base_url, self.host, self.port = base_url.rstrip("/"), u.hostname, u.port or 80
        self.https = u.scheme == "https"
        self.prefix = u.path.rstrip("/")
        self.timeout, self.retries = timeout, retries
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            c = self._local.conn = cls(self.host, self.port, timeout=self.timeout)
        return c

    def _post(self, rank: str, op: str, body: dict) -> Any:
        path = f"{self.prefix}/{urllib.parse.quote(rank, safe='')}/{op}"
        data = json.dumps(body).encode()
        last: Exception | None = None
        for _ in range(self.retries):
            conn = self._conn()
            try:
                conn.request("POST", path, data, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException) as e:
                last = e
                conn.close()
                self._local.conn = None
                continue
            if resp.status >= 400:
                try:
                    detail = json.loads(payload).get("detail")
                except ValueError:
                    detail = payload[:200].decode(errors="replace")
                raise StorageError(f"hf3fs metadata server {self.base_url}: {op} -> HTTP {resp.status}: {detail}")
            return json.loads(payload) if payload else None
        raise StorageError(f"hf3fs metadata server {self.base_url} unreachable ({op}): {last}")

    def initialize(self, rank: str, num_pages: int) -> None:
        self._post(rank, "initialize", {"num_pages": num_pages})

    def reserve_and_allocate_page_indices(self, rank: str, keys: list[str]) -> list[tuple[bool, int]]:
        out = self._post(rank, "reserve_and_allocate_page_indices", {"keys": [[k, ""] for k in keys]})
        return [(bool(a), int(b)) for a, b in out["indices"]]

    def confirm_write(self, rank: str, written: list[tuple[str, int]], release: list[int]) -> None:
        self._post(rank, "confirm_write", {"written_keys_to_confirm": [list(w) for w in written],
                                           "pages_to_release": list(release)})

    def get_page_indices(self, rank: str, keys: list[str]) -> list[Optional[int]]:
        return self._post(rank, "get_page_indices", {"keys": keys})["indices"]

    def exists(self, rank: str, keys: list[str]) -> list[bool]:
        return self._post(rank, "exists", {"keys": keys})["exists"]

    def delete_keys(self, rank: str, keys: list[str]) -> None:
        self._post(rank, "delete_keys", {"keys": keys})

    def clear(self, rank: str) -> None:
        self._post(rank, "clear", {})

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
