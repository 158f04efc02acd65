"""vLLM's CPU block byte order, learned from vLLM's own cache-write op, so the connector can keep pages in hicache's
page order (K then V; inside each, token, head, dim) -- the order our engine and SGLang's layer-major host pools
store -- and a prompt one engine computed is a storage hit in the others.

vLLM's CPU attention packs a block its own way per ISA (amx interleaves pairs of tokens, vec transposes K), and that
packing is written by one C++ op (``cpu_attn_reshape_and_cache``) that moves elements and never changes them. So the
order is a permutation, and :func:`probe` reads it off the op: it writes each plain element's index, a base-256
digit at a time (every digit is exact in bf16), into a scratch block and reads back where each index landed. The
probe checks that every block element came from exactly one plain element (no padding, no duplicates) and that a
random block packed through the permutation is bit-equal to the op's, or refuses to convert.

Nothing here imports vLLM: the op comes in as ``write``."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from hicache_core.errors import ConfigError

# write(key [T, H, D], value [T, H, D], cache [blocks, H, T, 2*D], slots [T]): vLLM's cache write for one block
Write = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

_DIGIT = 256  # integers below 256 are exact in every float dtype vLLM's CPU cache takes (bf16 keeps 8 bits)
KEEP = 'set "hicache_page_order": "vllm" in kv_connector_extra_config to store vLLM\'s own block bytes'
_BITWISE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@attrs.frozen(eq=False)
class BlockOrder:
    """``perm[j]`` is the plain index of a block's element ``j``; the plain order is (K|V, token, head, dim)."""

    perm: torch.Tensor
    inv: torch.Tensor
    label: str  # what it was read from, for the logs

    @property
    def numel(self) -> int:
        return int(self.perm.numel())

    def unpack(self, block: torch.Tensor, out: torch.Tensor) -> None:
        """A contiguous block's elements into ``out`` (contiguous, ``numel`` elements) in plain order."""
        torch.index_select(_bits(block).view(-1), 0, self.inv, out=_bits(out).view(-1))

    def pack(self, plain: torch.Tensor, block: torch.Tensor) -> None:
        """Plain-order elements (contiguous) into a contiguous block in vLLM's order."""
        torch.index_select(_bits(plain).view(-1), 0, self.perm, out=_bits(block).view(-1))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same bytes as integers: moving them can never canonicalize a NaN or a signed zero."""
    return t.view(_BITWISE[t.element_size()])


def probe(write: Write, heads: int, tokens: int, head_size: int, dtype: torch.dtype, label: str) -> BlockOrder:
    """The permutation ``write`` applies to one block of ``tokens`` x ``heads`` x ``head_size`` K and V. The op
    writes block 1 of a two-block scratch cache, so an op that wrote outside its block is caught too."""
    n = 2 * tokens * heads * head_size
    where = f"vLLM's CPU block order ({label}, {dtype}, {heads} heads x {tokens} tokens x {head_size})"
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ConfigError(f"{where}: the connector converts float16, bfloat16 and float32 blocks only; {KEEP}")
    index = torch.arange(n, dtype=torch.int64)
    perm = torch.zeros(n, dtype=torch.int64)
    slots = torch.arange(tokens, dtype=torch.int64) + tokens
    cache = torch.empty(2, heads, tokens, 2 * head_size, dtype=dtype)
    scale = 1
    while scale < n:
        digits = (index // scale % _DIGIT).to(dtype).view(2, tokens, heads, head_size)
        cache.fill_(-1)
        write(digits[0].contiguous(), digits[1].contiguous(), cache, slots)
        if not bool((cache[0] == -1).all()):
            raise ConfigError(f"{where}: the op wrote outside the block it was given; {KEEP}")
        got = cache[1].reshape(-1)
        if bool((got < 0).any()):
            raise ConfigError(f"{where}: the block has elements no K or V value lands in; {KEEP}")
        perm += got.to(torch.int64) * scale
        scale *= _DIGIT
    if not bool((torch.bincount(perm, minlength=n) == 1).all()):
        raise ConfigError(f"{where}: the op is not a reordering of K and V; {KEEP}")
    order = BlockOrder(perm=perm, inv=torch.argsort(perm), label=label)
    sample = torch.randn(2, tokens, heads, head_size).to(dtype)
    cache.zero_()
    write(sample[0].contiguous(), sample[1].contiguous(), cache, slots)
    packed = torch.empty(n, dtype=dtype)
    order.pack(sample.reshape(-1), packed)
    if not torch.equal(_bits(packed), _bits(cache[1].reshape(-1))):
        raise ConfigError(f"{where}: the op changes values as it writes them; {KEEP}")
    return order
