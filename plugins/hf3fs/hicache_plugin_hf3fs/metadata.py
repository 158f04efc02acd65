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
import time
import urllib.parse
import uuid
from collections import OrderedDict
from typing import Any, Optional

from hicache_core.errors import StorageError

TOKEN_ENV = "HICACHE_HF3FS_METADATA_TOKEN"


MAX_PAGES = 1 << 40  # slots per rank: memory is per used slot, so this bounds only the arithmetic
LEASE_S = 60.0  # a reservation not confirmed within this is taken back
MAX_KEYS = 4096  # keys per request


class RankMetadata:
    """Slots of one rank's file. Memory grows with the slots in use (fresh slots are handed out from a counter),
    so ``num_pages`` may be as large as the file. A reservation is a lease: unconfirmed after ``lease_s`` its slot
    goes back, so a client that died between reserve and confirm leaks nothing; a reserve retried with the same
    request id gets the same answer."""

    def __init__(self, num_pages: int, lease_s: float = LEASE_S) -> None:
        if not 0 < num_pages <= MAX_PAGES:
            raise ValueError(f"num_pages={num_pages} must be between 1 and {MAX_PAGES}")
        self.num_pages = num_pages
        self.lease_s = lease_s
        self.lock = threading.Lock()
        self.next_fresh = 0  # slots >= this were never handed out
        self.free_pages: list[int] = []  # slots handed back
        self.key_to_index: OrderedDict[str, int] = OrderedDict()
        self.reserved: dict[int, tuple[float, str]] = {}  # slot -> (lease expiry (monotonic), the key it is for)
        self._answers: OrderedDict[str, tuple[float, list[tuple[bool, int]]]] = OrderedDict()  # request id -> answer

    def _expire(self, now: float) -> None:
        for slot, (expiry, _) in list(self.reserved.items()):
            if expiry <= now:
                del self.reserved[slot]
                self.free_pages.append(slot)
        while self._answers and next(iter(self._answers.values()))[0] <= now:
            self._answers.popitem(last=False)

    def _take_slot(self) -> int:
        if self.free_pages:
            return self.free_pages.pop()
        if self.next_fresh < self.num_pages:
            self.next_fresh += 1
            return self.next_fresh - 1
        if self.key_to_index:
            return self.key_to_index.popitem(last=False)[1]
        return -1

    def reserve_and_allocate_page_indices(
        self, keys: list[str], request_id: Optional[str] = None
    ) -> list[tuple[bool, int]]:
        """(already exists, slot) per key; new keys get a free slot, else the LRU key's (-1 if none)."""
        now = time.monotonic()
        with self.lock:
            self._expire(now)
            if request_id and request_id in self._answers:
                return self._answers[request_id][1]  # a retry: the slots were reserved the first time
            out = []
            for key in keys:
                if key in self.key_to_index:
                    self.key_to_index.move_to_end(key)
                    out.append((True, self.key_to_index[key]))
                    continue
                slot = self._take_slot()
                if slot >= 0:
                    self.reserved[slot] = (now + self.lease_s, key)
                out.append((False, slot))
            if request_id:
                self._answers[request_id] = (now + self.lease_s, out)
            return out

    def confirm_write(self, written: list[tuple[str, int]], release: list[int]) -> list[str]:
        """Publish written keys whose slot is still reserved for them; keys whose lease expired (the slot may be
        another writer's by now) are refused and returned."""
        rejected = []
        with self.lock:
            self._expire(time.monotonic())
            for key, slot in written:
                lease = self.reserved.get(slot)
                if lease is None or lease[1] != key:
                    rejected.append(key)
                    continue
                del self.reserved[slot]
                old = self.key_to_index.get(key)
                if old is not None and old != slot:  # two writers raced on one key: keep one slot
                    self.free_pages.append(old)
                self.key_to_index[key] = slot
                self.key_to_index.move_to_end(key)
            for slot in release:
                if self.reserved.pop(slot, None) is not None:
                    self.free_pages.append(slot)
        return rejected

    def free_count(self) -> int:
        """Slots neither holding a key nor reserved."""
        with self.lock:
            return len(self.free_pages) + self.num_pages - self.next_fresh

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
            self.free_pages.extend(self.key_to_index.values())  # the slots go back, or they were lost for good
            self.key_to_index.clear()

    def stats(self) -> dict[str, int]:
        """Where every slot is: holding a key, reserved, free, or none of these (``lost``, a bug) -- and how many
        slots are counted twice (``doubled``, a bug: two keys would share bytes). ``keys + reserved + free`` is
        ``num_pages`` when the accounting is right."""
        with self.lock:
            self._expire(time.monotonic())
            held = list(self.key_to_index.values()) + list(self.reserved) + self.free_pages
            fresh = self.num_pages - self.next_fresh
            return {
                "num_pages": self.num_pages,
                "keys": len(self.key_to_index),
                "reserved": len(self.reserved),
                "free": len(self.free_pages) + fresh,
                "doubled": len(held) - len(set(held)),
                "lost": self.num_pages - fresh - len(set(held)),
            }
            self.reserved.clear()
            self._answers.clear()
            self.free_pages, self.next_fresh = [], 0

    def to_json(self) -> dict:
        with self.lock:
            # reserved-but-unconfirmed slots go back to free: their writes never became visible
            return {
                "num_pages": self.num_pages,
                "next_fresh": self.next_fresh,
                "free_pages": self.free_pages + sorted(self.reserved),
                "key_to_index": list(self.key_to_index.items()),
            }

    @classmethod
    def from_json(cls, d: Any, lease_s: float = LEASE_S) -> RankMetadata:
        """Rebuild from :meth:`to_json`; raises ValueError saying what is wrong with damaged data."""
        if not isinstance(d, dict):
            raise ValueError(f"a rank entry is {type(d).__name__}, not an object")
        try:
            m = cls(_int(d["num_pages"]), lease_s)
            m.free_pages = [_int(x) for x in d["free_pages"]]
            m.next_fresh = _int(d.get("next_fresh", m.num_pages))  # older files list every free slot
            pairs = d["key_to_index"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise TypeError("key_to_index must be a list of [key, slot] pairs")
            m.key_to_index = OrderedDict((_str(k), _int(v)) for k, v in pairs)
        except KeyError as e:
            raise ValueError(f"a rank entry lacks {e}") from None
        except TypeError as e:
            raise ValueError(f"a rank entry has the wrong shape ({e})") from None
        slots = m.free_pages + list(m.key_to_index.values())
        if any(not 0 <= x < m.num_pages for x in slots) or not 0 <= m.next_fresh <= m.num_pages:
            raise ValueError(f"slot numbers outside [0, {m.num_pages})")
        if len(set(slots)) != len(slots) or any(x >= m.next_fresh for x in slots):
            raise ValueError("a slot is listed twice (free and used, or used by two keys)")
        return m


def _int(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"{x!r} is not a whole number")
    return x


def _str(x: Any) -> str:
    if not isinstance(x, str):
        raise ValueError(f"key {x!r} is not a string")
    return x


class MetadataStore:
    """All ranks' metadata, with optional persistence to a JSON file (written atomically)."""

    def __init__(self, persist_path: Optional[str] = None, lease_s: float = LEASE_S) -> None:
        self.ranks: dict[str, RankMetadata] = {}
        self.lock = threading.Lock()
        self.persist_path = persist_path
        self.lease_s = lease_s
        if persist_path and os.path.exists(persist_path):
            self.ranks = self._load(persist_path)

    def _load(self, path: str) -> dict[str, RankMetadata]:
        fix = (
            f"move {path!r} away to start with an empty index (the pages it listed are then rewritten), "
            "or restore a backup"
        )
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"index file {path!r} is not text ({e.reason}); {fix}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"index file {path!r} is damaged: not JSON ({e.msg} at line {e.lineno}); {fix}") from None
        if not isinstance(data, dict):
            raise ValueError(f"index file {path!r} holds {type(data).__name__}, not an object of ranks; {fix}")
        ranks = {}
        for rank, d in data.items():
            try:
                ranks[rank] = RankMetadata.from_json(d, self.lease_s)
            except ValueError as e:
                raise ValueError(f"index file {path!r} is damaged at rank {rank!r}: {e}; {fix}") from None
        return ranks

    def initialize(self, rank: str, num_pages: int) -> None:
        with self.lock:
            m = self.ranks.get(rank)
            if m is None:
                self.ranks[rank] = RankMetadata(num_pages, self.lease_s)
            elif m.num_pages != num_pages:
                raise ValueError(
                    f"rank {rank!r} is initialized with {m.num_pages} pages, not {num_pages}: "
                    "the same file is used with another page size or file size"
                )

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

    def confirm_write(self, rank: str, written: list[tuple[str, int]], release: list[int]) -> list[str]:
        return self.store.rank(rank).confirm_write(written, release)

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

    def __init__(self, base_url: str, timeout: float = 10.0, retries: int = 3, token: Optional[str] = None) -> None:
        u = urllib.parse.urlparse(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"metadata_server_url {base_url!r} is not an http URL")
        self.base_url, self.host, self.port = base_url.rstrip("/"), u.hostname, u.port or 80
        self.https = u.scheme == "https"
        self.prefix = u.path.rstrip("/")
        self.timeout, self.retries = timeout, retries
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []  # every thread's, so close() closes them all
        self._all_lock = threading.Lock()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            c = self._local.conn = cls(self.host, self.port, timeout=self.timeout)
            with self._all_lock:
                self._all.append(c)
        return c

    def _post(self, rank: str, op: str, body: dict) -> Any:
        path = f"{self.prefix}/{urllib.parse.quote(rank, safe='')}/{op}"
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last: Exception | None = None
        for _ in range(self.retries):  # safe to retry: reserve carries a request id, the rest are idempotent
            conn = self._conn()
            try:
                conn.request("POST", path, data, headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException) as e:
                last = e
                conn.close()
                self._local.conn = None
                with self._all_lock:
                    if conn in self._all:
                        self._all.remove(conn)
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
        out = self._post(
            rank, "reserve_and_allocate_page_indices", {"keys": [[k, ""] for k in keys], "request_id": uuid.uuid4().hex}
        )
        return [(bool(a), int(b)) for a, b in out["indices"]]

    def confirm_write(self, rank: str, written: list[tuple[str, int]], release: list[int]) -> list[str]:
        out = self._post(
            rank,
            "confirm_write",
            {"written_keys_to_confirm": [list(w) for w in written], "pages_to_release": list(release)},
        )
        return list(out.get("rejected", [])) if isinstance(out, dict) else []

    def get_page_indices(self, rank: str, keys: list[str]) -> list[Optional[int]]:
        return self._post(rank, "get_page_indices", {"keys": keys})["indices"]

    def exists(self, rank: str, keys: list[str]) -> list[bool]:
        return self._post(rank, "exists", {"keys": keys})["exists"]

    def delete_keys(self, rank: str, keys: list[str]) -> None:
        self._post(rank, "delete_keys", {"keys": keys})

    def clear(self, rank: str) -> None:
        self._post(rank, "clear", {})

    def close(self) -> None:
        """Close every thread's connection (a thread that calls again opens a new one)."""
        with self._all_lock:
            conns, self._all = self._all, []
        for c in conns:
            c.close()
