"""Moving pages between the device pool and the host pool.

``io_backend``: ``kernel`` (the Triton kernel; CUDA, or CPU under ``TRITON_INTERPRET=1`` when forced),
``direct`` (run-coalesced torch copies; the fast path on CPU), ``reference`` (the per-token oracle).
``kernel`` on a machine without a GPU falls back to ``direct`` with one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Optional

import attrs
import torch

from hicache_core.errors import ConfigError
from hicache_core.transfer import direct, reference, triton_kernels

logger = logging.getLogger(__name__)


@attrs.frozen
class Mover:
    """What an io backend provides: the two moves every one has, and the faster ones some have (None: made of
    ``load_layer``, one layer a call)."""

    load_layer: Callable[..., None]  # (host, device, host_indices, device_indices, layer)
    backup_all_layers: Callable[..., None]  # (device, host, device_indices, host_indices)
    load_layers: Optional[Callable[..., None]] = None  # (host, device, host_indices, device_indices, first, end)
    load_all_layers: Optional[Callable[..., None]] = None  # (host, device, host_indices, device_indices)
    layer_group: Optional[Callable[..., int]] = None  # (host, device) -> layers a load_layers call should move


IMPLEMENTATIONS = {
    "kernel": Mover(
        triton_kernels.load_layer, triton_kernels.backup_all_layers, load_all_layers=triton_kernels.load_all_layers
    ),
    "direct": Mover(
        direct.load_layer, direct.backup_all_layers, direct.load_layers, direct.load_all_layers, direct.layer_group
    ),
    "reference": Mover(reference.load_layer, reference.backup_all_layers),
}
_fallback_logged = False


def effective_io_backend(io_backend: str, device: torch.device, *, force_kernel: bool = False) -> str:
    """The io backend that will really run: ``kernel`` without CUDA becomes ``direct`` (logged once)."""
    global _fallback_logged
    if io_backend not in IMPLEMENTATIONS:
        raise ConfigError(f"--hicache-io-backend: invalid value {io_backend!r}; choose one of kernel, direct")
    if io_backend != "kernel":
        return io_backend
    if device.type == "cuda" and triton_kernels.triton_usable():
        return "kernel"
    if force_kernel and triton_kernels.triton_usable():
        return "kernel"
    if not _fallback_logged:
        if device.type == "cuda":  # CUDA builds of torch bring Triton; a CPU build or a trimmed install may not
            logger.warning(
                "--hicache-io-backend kernel needs Triton, which is not installed (pip install 'hicache-core[kernel]');"
                " using direct"
            )
        else:
            logger.warning("--hicache-io-backend kernel needs a CUDA device; using direct on %s", device.type)
        _fallback_logged = True
    return "direct"


class HostDeviceTransfer:
    """Moves pages of one host pool to and from one device pool with the chosen io backend."""

    def __init__(self, host_pool, device_pool, io_backend: str = "kernel", *, force_kernel: bool = False) -> None:
        if host_pool.spec != device_pool.spec:
            raise ConfigError(f"host pool KV {host_pool.spec} does not match device pool KV {device_pool.spec}")
        if host_pool.page_size != device_pool.page_size:
            raise ConfigError(f"host page_size {host_pool.page_size} != device page_size {device_pool.page_size}")
        self.host, self.device = host_pool, device_pool
        self.io_backend = effective_io_backend(io_backend, device_pool.device, force_kernel=force_kernel)
        if self.io_backend == "kernel" and device_pool.device.type == "cuda" and not host_pool.pinned:
            raise ConfigError(
                "--hicache-io-backend kernel reads host memory from the GPU: the host pool must be pinned"
            )
        self._impl = IMPLEMENTATIONS[self.io_backend]
        self.layer_groups()  # a bad $HICACHE_DIRECT_LAYER_GROUP fails here, not in the first load

    def load_layer(self, host_indices: torch.Tensor, device_indices: torch.Tensor, layer: int) -> None:
        """Host -> device for one layer (the engine may use layer N as soon as this returns for N)."""
        self._impl.load_layer(self.host, self.device, host_indices, device_indices, layer)

    def layer_groups(self) -> list[tuple[int, int]]:
        """How a layer-wise load is cut into calls of :meth:`load_layers`: ``(first, end)`` spans covering every
        layer in order (one layer each, except where the io backend moves several faster, as direct between CPU
        pools does)."""
        group = self._impl.layer_group(self.host, self.device) if self._impl.layer_group is not None else 1
        n = self.host.layer_num
        return [(first, min(first + group, n)) for first in range(0, n, group)]

    def load_layers(self, host_indices: torch.Tensor, device_indices: torch.Tensor, first: int, end: int) -> None:
        """Host -> device for layers ``first`` to ``end - 1`` (usable as soon as this returns)."""
        if self._impl.load_layers is not None:
            self._impl.load_layers(self.host, self.device, host_indices, device_indices, first, end)
        else:
            for layer in range(first, end):
                self._impl.load_layer(self.host, self.device, host_indices, device_indices, layer)

    def load_all_layers(self, host_indices: torch.Tensor, device_indices: torch.Tensor) -> None:
        if self._impl.load_all_layers is not None:
            self._impl.load_all_layers(self.host, self.device, host_indices, device_indices)
        else:
            for layer in range(self.host.layer_num):
                self._impl.load_layer(self.host, self.device, host_indices, device_indices, layer)

    def backup_all_layers(self, device_indices: torch.Tensor, host_indices: torch.Tensor) -> None:
        """Device -> host for every layer."""
        self._impl.backup_all_layers(self.device, self.host, device_indices, host_indices)


__all__ = ["HostDeviceTransfer", "Mover", "effective_io_backend"]
