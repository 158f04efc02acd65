"""Pages through SGLang's host-pool API: random pages in, the same pages out."""

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

PS = 4


def storage_config(
    extra: dict, *, model: str, layout: str, mla: bool = False, tp_rank: int = 0, tp_size: int = 1
) -> HiCacheStorageConfig:
    """SGLang's own storage config for one rank, no pipeline or context parallelism (what its factory gets)."""
    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=False,
        is_page_first_layout=layout != "layer_first",
        model_name=model,
        extra_config=dict(extra),
    )


def random_pages(pool, host_indices) -> list[torch.Tensor]:
    """Random flat pages written with SGLang's ``set_from_flat_data_page``; returns what was written."""
    pages = []
    for i in range(0, len(host_indices), PS):
        page = torch.randn(pool.get_dummy_flat_data_page().shape).to(pool.dtype)
        pool.set_from_flat_data_page(int(host_indices[i]), page)
        pages.append(page)
    return pages


def read_pages(pool, host_indices) -> list[torch.Tensor]:
    return [pool.get_data_page(int(host_indices[i]), flat=True).clone() for i in range(0, len(host_indices), PS)]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def all_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return len(got) == len(want) and all(same(a, b) for a, b in zip(got, want))
