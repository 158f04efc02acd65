"""``hicache bench transfer``: device<->host page movement, GB/s per layout x io backend x direction, each beside
a plain contiguous copy of the same number of bytes between the same kinds of memory, measured in the same run."""

from __future__ import annotations

import argparse
import gc
import logging
from collections.abc import Callable
from typing import Any

import torch

from hicache_core.bench.common import dump_json, gbps, print_table, time_paired
from hicache_core.config import MAX_PAGE_SIZE, MEM_LAYOUTS
from hicache_core.memory import DTYPES, DevicePool, HostPool, KVSpec, default_device
from hicache_core.memory.buffer import cpu_buffer
from hicache_core.parse import arg_int
from hicache_core.transfer import HostDeviceTransfer, effective_io_backend

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pages",
        type=arg_int(1, 1 << 20),
        default=192,
        help="pages moved per transfer, scattered at random (default 192)",
    )
    p.add_argument("--page-size", type=arg_int(1, MAX_PAGE_SIZE), default=64)
    p.add_argument("--num-layers", type=arg_int(1, 4096), default=32)
    p.add_argument("--num-kv-heads", type=arg_int(1, 4096), default=8)
    p.add_argument("--head-dim", type=arg_int(1, 65536), default=128)
    p.add_argument(
        "--mla-dim", type=arg_int(0, 65536), default=576, help="MLA latent width (kv_lora_rank + rope dim); 0 skips MLA"
    )
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--layouts", default=",".join(MEM_LAYOUTS))
    p.add_argument(
        "--io", default="kernel,direct", help="io backends to measure (kernel needs CUDA; reference is slow)"
    )
    p.add_argument("--repeat", type=arg_int(1, 1000), default=9, help="pairs timed per row (default 9)")
    p.add_argument("--device", default=None, help="device pool device (default: cuda if present, else cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _baseline_buffers(nbytes: int, device: torch.device, pinned: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two buffers of nbytes of the same kinds of memory as the pools: pinned with CUDA, else CPU memory on huge
    pages where the pools have them."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) if pinned else cpu_buffer(nbytes)
    dev = cpu_buffer(nbytes) if device.type == "cpu" else torch.empty(nbytes, dtype=torch.uint8, device=device)
    host.fill_(1)
    dev.fill_(2)
    return host, dev


def _baseline(bufs: tuple[torch.Tensor, torch.Tensor], way: str) -> Callable[[], Any]:
    """One contiguous copy of the same bytes, host->device (h2d) or device->host."""
    host, dev = bufs
    if way == "h2d":
        return lambda: dev.copy_(host, non_blocking=True)
    return lambda: host.copy_(dev, non_blocking=True)


def _measure_shape(args, spec: KVSpec, shape_name: str, device: torch.device) -> list[dict]:
    ps, n = args.page_size, args.pages
    gen = torch.Generator().manual_seed(0)
    dev_pool = DevicePool(spec, n * ps, ps, device)
    dev_pool.kv_buffer.view(torch.uint8).fill_(3)
    # transfers pick every device page and a random half of the host pages, both in random order
    dev_idx = dev_pool.allocator.pages_to_indices(torch.randperm(n, generator=gen))
    rows = []
    nbytes = n * spec.page_bytes(ps)
    pinned = device.type == "cuda"
    base_bufs = _baseline_buffers(nbytes, device, pinned)
    for layout in args.layouts.split(","):
        host = HostPool(spec, 2 * n * ps, ps, layout, pin_memory=pinned)
        host.raw.fill_(5)
        host_idx = host.allocator.pages_to_indices(torch.randperm(2 * n, generator=gen)[:n])
        for io in args.io.split(","):
            real = effective_io_backend(io, device)
            if real != io:
                rows.append(
                    {
                        "shape": shape_name,
                        "layout": layout,
                        "io": io,
                        "direction": "-",
                        "note": f"skipped: {io} needs CUDA here",
                    }
                )
                continue
            mover = HostDeviceTransfer(host, dev_pool, io)

            def load_per_layer():  # as the controller does it: layer-wise, in the io backend's layer groups
                for first, end in mover.layer_groups():
                    mover.load_layers(host_idx, dev_idx, first, end)

            cases = [
                ("h2d per-layer", load_per_layer, "h2d"),
                ("d2h all-layer", lambda: mover.backup_all_layers(dev_idx, host_idx), "d2h"),
            ]
            for direction, fn, way in cases:
                # the baseline and the case alternate: this machine's memory bandwidth drifts within a run
                base_s, s, ratio = time_paired(_baseline(base_bufs, way), fn, args.repeat, device)
                rows.append(
                    {
                        "shape": shape_name,
                        "layout": layout,
                        "io": io,
                        "direction": direction,
                        "piece_bytes": spec.item_bytes * (ps if layout != "page_first" else 1),
                        "layers_per_call": mover.layer_groups()[0][1] if way == "h2d" else spec.layer_num,
                        "gbps": gbps(nbytes, s),
                        "baseline_gbps": gbps(nbytes, base_s),
                        "ratio": ratio,
                    }
                )
        del host
        gc.collect()
    del dev_pool
    gc.collect()
    return rows


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device) if args.device else default_device()
    dtype = DTYPES[args.dtype]
    shapes = [
        (
            f"MHA L{args.num_layers} H{args.num_kv_heads} D{args.head_dim}",
            KVSpec(layer_num=args.num_layers, head_num=args.num_kv_heads, head_dim=args.head_dim, dtype=dtype),
        )
    ]
    if args.mla_dim:
        shapes.append(
            (
                f"MLA L{args.num_layers} D{args.mla_dim}",
                KVSpec(layer_num=args.num_layers, head_num=1, head_dim=args.mla_dim, dtype=dtype, is_mla=True),
            )
        )
    rows = []
    for name, spec in shapes:
        rows += _measure_shape(args, spec, name, device)
    meta = {
        "device": str(device),
        "pages": args.pages,
        "page_size": args.page_size,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "baseline": "one contiguous copy_ of the same bytes (pinned host <-> GPU on CUDA)",
    }
    if args.json:
        dump_json({"meta": meta, "results": rows})
        return 0
    print(f"hicache bench transfer on {device}: {args.pages} scattered pages of {args.page_size} tokens, {args.dtype}")
    print("ratio = median over alternating pairs of (contiguous copy time / transfer time), same bytes, same run\n")
    print_table(
        [r for r in rows if "gbps" in r],
        "shape=shape:s; layout=layout:s; io=io:s; direction=direction:s; piece_bytes=piece B:d; "
        "layers_per_call=layers/call:d; gbps=GB/s:.2f; baseline_gbps=copy GB/s:.2f; ratio=ratio:.2f",
    )
    for r in rows:
        if "note" in r:
            print(f"{r['shape']} {r['layout']} {r['io']}: {r['note']}")
    return 0
