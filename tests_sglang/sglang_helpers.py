"""Pages through SGLang's host-pool API: random pages in, the same pages out."""

import torch

PS = 4


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
