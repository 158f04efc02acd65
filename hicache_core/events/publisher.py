"""KV events on the wire as vLLM publishes them: ZMQ PUB with a topic and a sequence number, and a replay socket.

Each batch goes out as three frames: the topic (UTF-8, default empty), the sequence number (8 bytes, big endian,
from 0 per publisher) and the msgpack payload (:mod:`hicache_core.events.wire`). The last ``buffer_steps`` batches
are kept: a subscriber that dropped sends ``[b"", start_seq]`` (8 bytes, big endian) to the ROUTER at
``replay_endpoint`` and gets every kept batch from ``start_seq`` on as ``[b"", topic, seq, payload]``, then the end
marker ``[b"", b"", -1, b""]``. An endpoint with ``*`` or ``::``, or an ``ipc://`` / ``inproc://`` one, is bound;
any other is connected to (a collector that binds). One thread owns both sockets; :meth:`ZmqPublisher.publish`
only queues (a full queue drops the batch after a second, counted and logged, rather than stall the cache).

``--kv-events-config`` takes vLLM's JSON (:class:`KVEventsConfig`): ``enable_kv_cache_events``, ``publisher``
(``zmq`` or ``null``), ``endpoint``, ``replay_endpoint``, ``topic``, ``buffer_steps``, ``hwm``,
``max_queue_size``; plus hicache's ``encoding`` (``map``, vLLM 0.30+; ``array`` for older decoders) and
``int_block_hashes`` (default true, as vLLM).
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
from typing import Any, Optional

import attrs

from hicache_core.errors import ConfigError
from hicache_core.events import EventBatch
from hicache_core.events.wire import ENCODINGS, encode_batch, msgpack_module

logger = logging.getLogger(__name__)
END_SEQ = (-1).to_bytes(8, "big", signed=True)


@attrs.frozen(kw_only=True)
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str = "zmq"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: Optional[str] = None
    topic: str = ""
    buffer_steps: int = 10000
    hwm: int = 100000
    max_queue_size: int = 100000
    encoding: str = "map"
    int_block_hashes: bool = True

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        """Parse ``--kv-events-config``: a JSON object with vLLM's keys (and hicache's two); a clear error for
        anything else."""
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--kv-events-config is not valid JSON ({e}); e.g. {EXAMPLE}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--kv-events-config must be a JSON object, e.g. {EXAMPLE}")
        fields = {a.name: a for a in attrs.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(f"--kv-events-config: unknown key(s) {', '.join(unknown)}; it takes {', '.join(fields)}")
        for k, v in raw.items():
            if v is None and fields[k].default is None:
                continue
            want = type(fields[k].default) if fields[k].default is not None else str
            if want is int and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"--kv-events-config: {k} must be a positive integer, not {v!r}")
            if want is not int and not isinstance(v, want):
                raise ConfigError(f"--kv-events-config: {k} must be a {want.__name__}, not {v!r}")
        cfg = cls(**raw)
        if cfg.publisher not in ("zmq", "null"):
            raise ConfigError(f"--kv-events-config: publisher {cfg.publisher!r}: zmq or null")
        if cfg.encoding not in ENCODINGS:
            raise ConfigError(f"--kv-events-config: encoding {cfg.encoding!r}: one of {', '.join(ENCODINGS)}")
        for k in ("endpoint", "replay_endpoint"):
            ep = getattr(cfg, k)
            if ep is not None and "://" not in ep:
                raise ConfigError(f"--kv-events-config: {k} {ep!r} is not a ZMQ endpoint (e.g. tcp://*:5557)")
        return cfg

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"


EXAMPLE = '{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'


def _binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class ZmqPublisher:
    """A subscriber of :class:`~hicache_core.events.KVEvents` that publishes each batch over ZMQ."""

    def __init__(self, config: KVEventsConfig, data_parallel_rank: Optional[int] = None) -> None:
        msgpack_module()
        try:
            import zmq
        except ImportError:
            raise ConfigError("KV events need pyzmq: pip install 'hicache-core[events]'") from None
        self.config = config
        self.dp_rank = data_parallel_rank
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._queue: queue.Queue[Optional[EventBatch]] = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: collections.deque[tuple[bytes, bytes]] = collections.deque(maxlen=config.buffer_steps)
        self._topic = config.topic.encode()
        self._seq = 0
        self.dropped = 0
        self.sent = 0
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._replay = self._ctx.socket(zmq.ROUTER) if config.replay_endpoint else None
        try:
            self.endpoint = self._open(self._pub, config.endpoint)
            self.replay_endpoint = self._open(self._replay, config.replay_endpoint) if self._replay else None
        except zmq.ZMQError as e:
            self._close_sockets()
            raise ConfigError(f"--kv-events-config: cannot open {config.endpoint}: {e}") from None
        self._thread = threading.Thread(target=self._run, name="hicache-kv-events", daemon=True)
        self._thread.start()

    def _open(self, sock: Any, endpoint: Optional[str]) -> Optional[str]:
        if endpoint is None:
            return None
        if _binds(endpoint):
            sock.bind(endpoint)
            return sock.getsockopt(self._zmq.LAST_ENDPOINT).decode()
        sock.connect(endpoint)
        return endpoint

    def __call__(self, batch: EventBatch) -> None:
        self.publish(batch)

    def publish(self, batch: EventBatch) -> None:
        if self.dp_rank is not None and batch.data_parallel_rank is None:
            batch = attrs.evolve(batch, data_parallel_rank=self.dp_rank)
        try:
            self._queue.put(batch, timeout=1.0)
        except queue.Full:
            self.dropped += 1
            logger.warning("kv events: the publish queue is full (%d batches); dropped one", self.config.max_queue_size)

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        while True:
            try:
                batch = self._queue.get(timeout=0.01)
            except queue.Empty:
                batch = None
            else:
                if batch is None:
                    break
                seq = self._seq.to_bytes(8, "big")
                self._seq += 1
                payload = encode_batch(batch, self.config.encoding)
                self._buffer.append((seq, payload))
                self._pub.send_multipart([self._topic, seq, payload], copy=False)
                self.sent += 1
            if self._replay is not None and poller.poll(0):
                self._serve_replay()
        self._close_sockets()

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()  # type: ignore[union-attr]
        if len(frames) != 3 or len(frames[2]) != 8:
            logger.warning("kv events: a replay request must be [identity, b'', start_seq (8 bytes)]; ignored")
            return
        ident, start = frames[0], int.from_bytes(frames[2], "big")
        for seq, payload in list(self._buffer):
            if int.from_bytes(seq, "big") >= start:
                self._replay.send_multipart([ident, b"", self._topic, seq, payload])  # type: ignore[union-attr]
        self._replay.send_multipart([ident, b"", b"", END_SEQ, b""])  # type: ignore[union-attr]

    def _close_sockets(self) -> None:
        for s in (self._pub, self._replay):
            if s is not None:
                s.close(linger=500)
        self._ctx.term()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then close the sockets."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
