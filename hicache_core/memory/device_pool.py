"""The L1 device pool: paged KV on the engine's device (CUDA where present, else CPU), layer-first.

MHA keeps ``(2, layer_num, size, head_num, head_dim)``; MLA ``(layer_num, size, 1, kv_dim)``. Reading a layer's
buffers goes through :meth:`wait_layer`, which the controller points at its per-layer ready signal so that the
attention of layer N waits only for layer N of a load in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional

import torch

from hicache_core.memory.allocator import PageAllocator
from hicache_core.memory.buffer import cpu_buffer
from hicache_core.memory.kv_codec import decode, encode
from hicache_core.memory.spec import KVSpec, require_host_memory


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class DevicePool:
    """Paged KV for running requests, with a page-granular allocator."""

    def __init__(self, spec: KVSpec, num_tokens: int, page_size: int, device: Optional[torch.device | str] = None):
        if num_tokens <= 0 or num_tokens % page_size:
            raise ValueError(f"device pool size {num_tokens} must be a positive multiple of page_size {page_size}")
        self.spec, self.size, self.page_size = spec, num_tokens, page_size
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = spec.dtype
        self.layer_num = spec.layer_num
        self.is_mla = spec.is_mla
        shape: tuple[int, ...] = (spec.layer_num, num_tokens, spec.head_num, spec.head_dim)
        if not spec.is_mla:
            shape = (2, *shape)
        if self.device.type == "cpu":
            require_host_memory(num_tokens * spec.size_per_token, f"the device pool ({num_tokens} tokens, on the CPU)")
        if self.device.type == "cpu":  # huge pages where possible (memory/buffer.py)
            raw = cpu_buffer(num_tokens * spec.size_per_token, zero=True, prefault=True)
            self.kv_buffer = raw.view(spec.dtype).view(shape)
        else:
            self.kv_buffer = torch.zeros(shape, dtype=spec.dtype, device=self.device)
        self.allocator = PageAllocator(num_tokens, page_size)
        self._layer_waiter: Optional[Callable[[int], None]] = None
        self.layer_wait_s = 0.0  # seconds the forward passes spent blocked on loads in flight (TTFT's load phase)

    # --- per-layer access ----------------------------------------------------------------------------------------
    def set_layer_waiter(self, waiter: Optional[Callable[[int], None]]) -> None:
        """Install the function that blocks until layer N of any load in flight has landed."""
        self._layer_waiter = waiter

    def wait_layer(self, layer_id: int) -> None:
        if self._layer_waiter is not None:
            t0 = time.perf_counter()
            self._layer_waiter(layer_id)
            self.layer_wait_s += time.perf_counter() - t0

    def k_buffer(self, layer_id: int) -> torch.Tensor:
        return self.kv_buffer[layer_id] if self.is_mla else self.kv_buffer[0, layer_id]

    def v_buffer(self, layer_id: int) -> torch.Tensor:
        return self.kv_buffer[layer_id] if self.is_mla else self.kv_buffer[1, layer_id]

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, after that layer's pending load (if any) has landed."""
        self.wait_layer(layer_id)
        return self.k_buffer(layer_id), self.v_buffer(layer_id)

    def set_kv(self, layer_id: int, indices: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor] = None) -> None:
        """Write K (and V) values of the tokens at ``indices``, encoded as the spec stores them (kv_codec)."""
        self.k_buffer(layer_id)[indices] = encode(self.spec, k)
        if not self.is_mla:
            assert v is not None
            self.v_buffer(layer_id)[indices] = encode(self.spec, v)

    def read_kv(self, layer_id: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V values of the tokens at ``indices`` (decoded: float32 for fp8 with scales; MLA's latent as
        both). Call after :meth:`wait_layer`."""
        k = decode(self.spec, self.k_buffer(layer_id)[indices])
        return k, (k if self.is_mla else decode(self.spec, self.v_buffer(layer_id)[indices]))

    def token_strides(self) -> tuple[int, int, int, int]:
        """Byte strides (page, token-in-page, layer, K->V) of the layer-first device buffer."""
        item = self.spec.item_bytes
        return (self.page_size * item, item, self.size * item, self.layer_num * self.size * item)

    # --- allocation ----------------------------------------------------------------------------------------------
    def alloc(self, num_tokens: int) -> Optional[torch.Tensor]:
        return self.allocator.alloc(num_tokens)

    def free(self, indices: torch.Tensor) -> None:
        self.allocator.free(indices)

    def available_size(self) -> int:
        return self.allocator.available_size()
