"""hicache's tiers in vLLM's own KV-event stream: what the connector's host tier (medium ``CPU``) and storage
(``STORAGE``) gain and lose, named by vLLM's block hashes, so a router that follows vLLM's events (llm-d, Dynamo,
vLLM's own) sees hicache's pages as the same blocks as vLLM's GPU ones.

The scheduler half records each change as it plans it (:class:`TierEvents`); the connector's ``take_events`` turns
the records into vLLM's ``BlockStored`` / ``BlockRemoved`` each step (:func:`to_vllm`), and vLLM publishes them
with its own. One hicache page is one vLLM block (the connector's page size is vLLM's block size), so a page's id
is the request's ``block_hashes`` entry for that block. A page whose request has no hash for it yet is not
reported. A removal is reported for the pages the records still know (the last :data:`KNOWN` of them).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

KNOWN = 1 << 16  # pages whose hash, parent and tokens are remembered, for their later removal or backup


class TierEvents:
    """Changes to the host tier and storage, as (kind, medium, (hash, parent, tokens, lora), block size)."""

    def __init__(self, block_size: int, enabled: bool = True) -> None:
        self.bs, self.enabled = block_size, enabled
        self.pending: list[tuple[str, str, tuple, int]] = []
        self._known: OrderedDict[str, tuple] = OrderedDict()

    def stored(self, key: str, request: Any, page: int, medium: str) -> None:
        """Page ``page`` of ``request`` (hicache key ``key``) is now held by ``medium``."""
        if not self.enabled:
            return
        info = self._known.get(key)
        if info is None:
            hashes = getattr(request, "block_hashes", None) or ()
            if len(hashes) <= page:
                return
            bs = self.bs
            tokens = list(request.all_token_ids[page * bs : (page + 1) * bs])
            info = (hashes[page], hashes[page - 1] if page else None, tokens, getattr(request, "lora_request", None))
            self._known[key] = info
            if len(self._known) > KNOWN:
                self._known.popitem(last=False)
        self.pending.append(("stored", medium, info, self.bs))

    def stored_again(self, key: str, medium: str) -> None:
        """A page the records know (a host page backed up on eviction) is now held by ``medium`` too."""
        info = self._known.get(key) if self.enabled else None
        if info is not None:
            self.pending.append(("stored", medium, info, self.bs))

    def removed(self, key: str, medium: str) -> None:
        info = self._known.get(key) if self.enabled else None
        if info is not None:
            self.pending.append(("removed", medium, info, self.bs))

    def take(self) -> list[tuple[str, str, tuple, int]]:
        out, self.pending = self.pending, []
        return out


def to_vllm(records: list[tuple[str, str, tuple, int]]) -> list[Any]:
    """The records as vLLM's event objects, hashes as vLLM publishes them (``maybe_convert_block_hash``)."""
    if not records:
        return []
    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    def ext(h: Optional[bytes]) -> Any:
        return None if h is None else maybe_convert_block_hash(h)

    out: list[Any] = []
    for kind, medium, (h, parent, tokens, lora), bs in records:
        if kind == "removed":
            out.append(BlockRemoved(block_hashes=[ext(h)], medium=medium))
            continue
        out.append(
            BlockStored(
                block_hashes=[ext(h)],
                parent_block_hash=ext(parent),
                token_ids=tokens,
                block_size=bs,
                lora_id=getattr(lora, "adapter_id", None) if lora is not None else None,
                medium=medium,
                lora_name=getattr(lora, "name", None) if lora is not None else None,
            )
        )
    return out
