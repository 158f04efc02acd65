"""A checkpoint's identity from its content, for the storage namespace: pages written for one set of weights are
never served to another, even when the directory keeps its name (a model updated in place).

The fingerprint digests every file that decides what KV a token gets: ``config.json`` (quantization included), the
tokenizer's files and every weight file, each by its full content (xxh3-128; a GGUF file is one file holding all
three). Digesting is cheap next to loading the weights (``hicache bench fingerprint`` measures it against a raw
read of the same bytes) and is remembered per file by (size, mtime, ctime, inode), so a restart on an unchanged
checkpoint reads nothing twice: any write to a file, a ``cp -p``/``rsync -t`` that keeps its mtime included,
changes its ctime or inode and invalidates the entry. The memo lives beside the checkpoint
(``.hicache-fingerprint.json``) or, where that is read only, under ``$XDG_CACHE_HOME/hicache/fingerprints``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import xxhash

logger = logging.getLogger(__name__)

MEMO = ".hicache-fingerprint.json"
# files besides the weights that change the KV a token gets (tokenizer files change which ids a text becomes)
CONFIG_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
)
CHUNK = 8 << 20


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _memo_path(checkpoint: Path) -> tuple[Path, Path]:
    """(beside the checkpoint, the per-user fallback)."""
    beside = checkpoint / MEMO if checkpoint.is_dir() else checkpoint.with_name(checkpoint.name + MEMO)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hicache" / "fingerprints"
    return beside, home / (hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:32] + ".json")


def _load_memo(paths: tuple[Path, Path]) -> dict:
    for p in paths:
        try:
            memo = json.loads(p.read_text())
            if isinstance(memo, dict):
                return memo
        except (OSError, ValueError):
            continue
    return {}


def _save_memo(paths: tuple[Path, Path], memo: dict) -> None:
    for p in paths:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
            os.replace(tmp, p)
            return
        except OSError:
            continue
    logger.info("model fingerprint: no writable place for its memo (%s); it is recomputed at each start", paths[0])


def checkpoint_files(checkpoint: Path) -> list[Path]:
    if checkpoint.is_file():
        return [checkpoint]
    names = {p.name for p in checkpoint.iterdir() if p.is_file()}
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    return [checkpoint / n for n in sorted(set(CONFIG_FILES) & names) + weights]


def checkpoint_fingerprint(checkpoint: str | Path, *, memo: bool = True) -> str:
    """The content digest of a Hugging Face model directory or a GGUF file (hex, 32 characters)."""
    path = Path(checkpoint).expanduser()
    paths = _memo_path(path)
    known = _load_memo(paths) if memo else {}
    entries: dict[str, dict] = {}
    changed = False
    for f in checkpoint_files(path):
        stamp = _stamp(f.stat())
        old = known.get(f.name)
        if isinstance(old, dict) and old.get("stamp") == stamp and isinstance(old.get("xxh3_128"), str):
            entries[f.name] = old
            continue
        entries[f.name] = {"stamp": stamp, "xxh3_128": file_digest(f)}
        changed = True
    if memo and (changed or set(entries) != set(known)):
        _save_memo(paths, entries)
    text = "\n".join(f"{name} {e['xxh3_128']}" for name, e in sorted(entries.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def random_fingerprint(fields: dict) -> str:
    """The random model's identity: its seed and shape (its weights follow from them)."""
    text = ";".join(f"{k}={v}" for k, v in sorted(fields.items()))
    return "random-" + hashlib.sha256(text.encode()).hexdigest()[:24]
