"""The oracle: plain per-token indexing, written for obviousness, not speed. Every other path is tested against it."""

from __future__ import annotations

import torch


def _host_layer(host, kv: int, layer: int) -> torch.Tensor:
    """Host KV of one layer as (page, token-in-page, head, dim), whatever the layout."""
    buf = host.kv_buffer if host.is_mla else host.kv_buffer[kv]
    ps = host.page_size
    if host.layout == "layer_first":
        return buf[layer].unflatten(0, (-1, ps))
    if host.layout == "page_first":
        return buf[:, layer].unflatten(0, (-1, ps))
    return buf[:, layer]


def _device_layer(device, kv: int, layer: int) -> torch.Tensor:
    return device.k_buffer(layer) if kv == 0 else device.v_buffer(layer)


def load_layer(host, device, host_indices, device_indices, layer: int) -> None:
    hi = host_indices.cpu()
    for kv in range(host.spec.num_kv):
        src = _host_layer(host, kv, layer)[hi // host.page_size, hi % host.page_size]
        _device_layer(device, kv, layer)[device_indices.to(device.device)] = src.to(device.device)


def backup_all_layers(device, host, device_indices, host_indices) -> None:
    hi = host_indices.cpu()
    for layer in range(host.layer_num):
        for kv in range(host.spec.num_kv):
            src = _device_layer(device, kv, layer)[device_indices.to(device.device)].cpu()
            _host_layer(host, kv, layer)[hi // host.page_size, hi % host.page_size] = src
