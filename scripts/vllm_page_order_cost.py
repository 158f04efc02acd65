"""What the vLLM connector's ``hicache`` page order costs: converting a page between vLLM's block order and hicache's
(on the writer thread before a backup, on the loader thread after a storage read), against copying the same page
between host slots (what a backup does anyway), measured in the same run on SmolLM2-135M's geometry (30 layers, 3
KV heads of 64, 128-token blocks) with vLLM's real cache-write op for this CPU's ISA. Run in the vllm env:
``python scripts/vllm_page_order_cost.py``."""

import statistics
import time
import warnings

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from hicache_core.integrations.vllm.connector import _cpu_isa, cpu_block_order
from hicache_core.integrations.vllm.settings import Geometry
from hicache_core.integrations.vllm.worker import WorkerHalf

LAYERS, HEADS, DIM, BS, BLOCKS = 30, 3, 64, 128, 32


def seconds(fn, repeat=7):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)  # vLLM's CPU worker copies on its own thread
    for dtype in (torch.bfloat16, torch.float32):
        g = Geometry(tuple(f"l{i}" for i in range(LAYERS)), BLOCKS, BS, HEADS, DIM, dtype)
        caches = {n: torch.randn(BLOCKS, HEADS, BS, 2 * DIM).to(dtype) for n in g.layer_names}
        blocks = list(range(BLOCKS))
        w = WorkerHalf(g, 2 * BLOCKS, 1, cpu_block_order(g))
        w.register(caches)
        slots, other = list(range(BLOCKS)), list(range(BLOCKS, 2 * BLOCKS))
        for layer in range(LAYERS):
            w._to_host(layer, blocks, slots)
        nbytes = BLOCKS * g.page_bytes
        copy = nbytes / seconds(lambda: w._copy_slots(slots, other)) / 1e9
        unpack = nbytes / seconds(lambda: w._reorder(slots, unpack=True)) / 1e9
        pack = nbytes / seconds(lambda: w._reorder(slots, unpack=False)) / 1e9
        w.close()
        print(
            f"{str(dtype):15} isa {_cpu_isa(g):4}  unpack {unpack:5.2f} GB/s = {unpack / copy:.2f}x of a host-slot "
            f"copy ({copy:.2f})  pack {pack:5.2f} GB/s = {pack / copy:.2f}x"
        )


if __name__ == "__main__":
    main()
