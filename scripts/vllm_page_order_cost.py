"""What the vLLM connector's ``hicache`` page order costs at its copies, against the ``vllm`` order's whole-block
copies, measured in the same run on SmolLM2-135M's geometry (30 layers, 3 KV heads of 64, 128-token blocks) with
vLLM's real cache-write op for this CPU's ISA. Run in the vllm env: ``python scripts/vllm_page_order_cost.py``."""

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
        row = {}
        for name, order in (("vllm", None), ("hicache", cpu_block_order(g))):
            w = WorkerHalf(g, BLOCKS, 1, order)
            w.register(caches)
            save = seconds(lambda: [w._to_host(layer, blocks, blocks) for layer in range(LAYERS)])
            load = seconds(lambda: w._to_blocks(blocks, blocks))
            w.close()
            row[name] = (BLOCKS * g.page_bytes / save / 1e9, BLOCKS * g.page_bytes / load / 1e9)
        (vs, vl), (hs, hl) = row["vllm"], row["hicache"]
        print(
            f"{str(dtype):15} isa {_cpu_isa(g):4}  save {hs:5.2f} GB/s = {hs / vs:.2f}x of whole-block copies "
            f"({vs:.2f})  load {hl:5.2f} GB/s = {hl / vl:.2f}x ({vl:.2f})"
        )


if __name__ == "__main__":
    main()
