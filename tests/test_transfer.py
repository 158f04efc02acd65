"""Every (layout, io backend, direction, MHA/MLA) against the reference oracle, bit for bit, on odd shapes."""

import logging
import zlib

import pytest
import torch

from hicache_core.errors import ConfigError
from hicache_core.memory import DevicePool, HostPool, KVSpec, default_device
from hicache_core.transfer import HostDeviceTransfer, reference
from hicache_core.transfer.direct import page_runs

LAYOUTS = ["layer_first", "page_first", "page_first_direct"]
PS = 4
DEV = default_device()  # CUDA where present (the kernel runs for real), else CPU (kernel under the interpreter)
PIN = DEV.type == "cuda"


def spec(mla: bool) -> KVSpec:
    # odd sizes on purpose: 3 layers, head_dim 6 (12-byte items: the kernel must fall back to 4-byte words)
    return KVSpec(layer_num=3, head_num=1 if mla else 3, head_dim=6, dtype=torch.bfloat16, is_mla=mla)


def randomize(t: torch.Tensor, gen: torch.Generator) -> None:
    b = t.view(torch.uint8)
    b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen).to(b.device))


def pages(*ids: int) -> torch.Tensor:
    return torch.cat([torch.arange(p * PS, (p + 1) * PS) for p in ids])


# (host pages, device pages): 7 pages scattered, one page, repeated runs of consecutive pages
CASES = {
    "scattered7": ((9, 2, 14, 5, 0, 11, 7), (3, 12, 0, 8, 5, 1, 10)),
    "one_page": ((13,), (6,)),
    "runs": ((2, 3, 4, 10, 11, 0, 1), (5, 6, 7, 0, 1, 12, 13)),
}


def make(mla, layout, gen, kv: KVSpec | None = None):
    s = kv or spec(mla)
    host = HostPool(s, 16 * PS, PS, layout, pin_memory=PIN)
    dev = DevicePool(s, 14 * PS, PS, DEV)
    randomize(host.raw, gen)
    randomize(dev.kv_buffer, gen)
    return host, dev


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("io", ["direct", "kernel"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_matches_reference(mla, layout, io, case):
    check_against_reference(mla, layout, io, case, spec(mla))


def check_against_reference(mla, layout, io, case, kv: KVSpec):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{mla}{layout}{io}{case}".encode()))
    hp, dp = CASES[case]
    hi, di = pages(*hp), pages(*dp)
    host, dev = make(mla, layout, gen, kv)
    host2, dev2 = make(mla, layout, gen, kv)
    host2.raw.copy_(host.raw)
    dev2.kv_buffer.copy_(dev.kv_buffer)
    mover = HostDeviceTransfer(host2, dev2, io, force_kernel=True)
    assert mover.io_backend == io

    # host -> device, layer by layer
    for layer in (2, 0, 1):
        reference.load_layer(host, dev, hi, di, layer)
        mover.load_layer(hi, di, layer)
        assert same(dev.kv_buffer, dev2.kv_buffer), f"load layer {layer}"
    # host -> device, all layers at once
    randomize(host.raw, gen)
    host2.raw.copy_(host.raw)
    for layer in range(3):
        reference.load_layer(host, dev, hi, di, layer)
    mover.load_all_layers(hi, di)
    assert same(dev.kv_buffer, dev2.kv_buffer), "load all layers"
    # host -> device, in spans of layers as the controller loads (layer_groups), here cut 2 + 1
    randomize(host.raw, gen)
    host2.raw.copy_(host.raw)
    for layer in range(3):
        reference.load_layer(host, dev, hi, di, layer)

    def layer_of(buf, layer):
        return buf[layer] if mla else buf[:, layer]

    before = layer_of(dev2.kv_buffer, 2).clone()
    mover.load_layers(hi, di, 0, 2)
    assert same(layer_of(dev2.kv_buffer, 2), before), "a span of layers 0-1 wrote layer 2"
    mover.load_layers(hi, di, 2, 3)
    assert same(dev.kv_buffer, dev2.kv_buffer), "load layers in spans"
    # device -> host, all layers
    randomize(dev.kv_buffer, gen)
    dev2.kv_buffer.copy_(dev.kv_buffer)
    reference.backup_all_layers(dev, host, di, hi)
    mover.backup_all_layers(di, hi)
    assert same(host.raw, host2.raw), "backup"


@pytest.fixture
def copier_mode(request, monkeypatch):
    """The direct io's CPU copier: the streaming C copier streaming (every transfer), the same copier through the
    cache, or numpy's copyto (no copier built)."""
    from hicache_core.transfer import direct, native

    if request.param == "numpy":
        monkeypatch.setattr(native, "_LIB", [None])
    else:
        assert native.copier() is not None, "the streaming copier did not build: is a C compiler on PATH?"
        monkeypatch.setattr(direct, "STREAM_MIN_BYTES", 0 if request.param == "stream" else 1 << 62)
    return request.param


@pytest.mark.parametrize("copier_mode", ["stream", "cached", "numpy"], indirect=True)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_direct_copiers_match_reference(mla, layout, case, copier_mode):
    # wide items (600 B MHA, 400 B MLA) at offsets that are not 16-byte aligned: the streaming loop, its unaligned
    # head and its tail all run; the odd 12-byte shape of spec() covers pieces shorter than one streamed block
    wide = KVSpec(layer_num=3, head_num=1 if mla else 3, head_dim=200 if mla else 100, dtype=torch.bfloat16, is_mla=mla)
    for kv in (wide, spec(mla)):
        check_against_reference(mla, layout, "direct", case, kv)


def test_direct_copier_refuses_pages_out_of_range():
    from hicache_core.transfer import direct, native

    if native.copier() is None:
        pytest.fail("the streaming copier did not build: is a C compiler on PATH?")
    host, dev = make(False, "layer_first", torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="destination pages out of range 0..13"):
        direct.load_all_layers(host, dev, pages(1), pages(14))
    with pytest.raises(ValueError, match="source pages out of range 0..15"):
        direct.backup_all_layers(host, dev, pages(16), pages(1))


def test_copier_build_failure_falls_back_to_numpy(monkeypatch, tmp_path, caplog):
    from hicache_core.transfer import native

    monkeypatch.setattr(native, "_LIB", [])
    monkeypatch.setenv("HICACHE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    caplog.set_level(logging.WARNING)
    assert native.copier() is None
    assert "streaming copier could not be built" in caplog.text and "false exited 1" in caplog.text
    assert native.copier() is None and caplog.text.count("could not be built") == 1  # tried and logged once
    check_against_reference(False, "page_first", "direct", "runs", spec(False))  # numpy copies it
    monkeypatch.setattr(native, "_LIB", [])
    monkeypatch.setenv("HICACHE_NATIVE_COPY", "0")
    assert native.copier() is None


def test_layer_groups_cover_every_layer_once_in_order(monkeypatch):
    from hicache_core.transfer import direct

    s = KVSpec(layer_num=11, head_num=2, head_dim=4, dtype=torch.bfloat16)
    for layout, group in (("layer_first", 4), ("page_first", 8)):
        host = HostPool(s, 4 * PS, PS, layout, pin_memory=False)
        mover = HostDeviceTransfer(host, DevicePool(s, 4 * PS, PS, torch.device("cpu")), "direct")
        spans = mover.layer_groups()
        assert [layer for a, b in spans for layer in range(a, b)] == list(range(11))
        assert spans[0] == (0, group)
    monkeypatch.setattr(direct, "_GROUP_ENV", "1")
    assert mover.layer_groups() == [(i, i + 1) for i in range(11)]
    monkeypatch.setattr(direct, "_GROUP_ENV", "many")
    with pytest.raises(ConfigError, match="HICACHE_DIRECT_LAYER_GROUP='many': give a whole number"):
        HostDeviceTransfer(host, DevicePool(s, 4 * PS, PS, torch.device("cpu")), "direct")
    ref = HostDeviceTransfer(host, DevicePool(s, 4 * PS, PS, torch.device("cpu")), "reference")
    assert ref.layer_groups() == [(i, i + 1) for i in range(11)]  # one layer a call where nothing says otherwise


def test_reference_roundtrip_is_identity():
    gen = torch.Generator().manual_seed(0)
    for layout in LAYOUTS:
        host, dev = make(False, layout, gen)
        hi, di = pages(5, 1, 8), pages(0, 4, 2)
        reference.backup_all_layers(dev, host, di, hi)
        before = dev.kv_buffer.clone()
        randomize(dev.kv_buffer, gen)
        for layer in range(3):
            reference.load_layer(host, dev, hi, di, layer)
        assert same(dev.kv_buffer[:, :, di.to(DEV)], before[:, :, di.to(DEV)])


def test_page_runs():
    runs = page_runs(pages(2, 3, 4, 10, 11, 0), pages(5, 6, 7, 0, 2, 3), PS)
    assert runs.tolist() == [[2, 5, 3], [10, 0, 1], [11, 2, 1], [0, 3, 1]]
    with pytest.raises(ValueError, match="page boundaries"):
        page_runs(torch.arange(1, 5), torch.arange(4), PS)
    with pytest.raises(ValueError, match="lengths differ"):
        page_runs(torch.arange(8), torch.arange(4), PS)


def test_kernel_without_gpu_falls_back_to_direct_once(caplog, monkeypatch):
    import hicache_core.transfer as t

    monkeypatch.setattr(t, "_fallback_logged", False)
    caplog.set_level(logging.WARNING)
    host, dev = make(False, "layer_first", torch.Generator().manual_seed(1))
    assert HostDeviceTransfer(host, dev, "kernel").io_backend == ("kernel" if torch.cuda.is_available() else "direct")
    HostDeviceTransfer(host, dev, "kernel")
    if not torch.cuda.is_available():
        assert caplog.text.count("using direct") == 1


def test_mismatched_pools_are_refused():
    host = HostPool(spec(False), 8 * PS, PS, "layer_first", pin_memory=False)
    with pytest.raises(ConfigError, match="does not match device pool"):
        HostDeviceTransfer(host, DevicePool(spec(True), 8 * PS, PS, "cpu"), "direct")
    with pytest.raises(ConfigError, match="page_size"):
        HostDeviceTransfer(host, DevicePool(spec(False), 16, 8, "cpu"), "direct")
    with pytest.raises(ConfigError, match="invalid value 'dma'"):
        HostDeviceTransfer(host, DevicePool(spec(False), 8 * PS, PS, "cpu"), "dma")


def test_kernel_without_triton_says_how_to_install_it(caplog, monkeypatch):
    import hicache_core.transfer as t
    from hicache_core.transfer import triton_kernels

    monkeypatch.setattr(t, "_fallback_logged", False)
    monkeypatch.setattr(triton_kernels, "triton_usable", lambda: False)  # as where Triton is not installed
    caplog.set_level(logging.WARNING)
    assert t.effective_io_backend("kernel", torch.device("cuda")) == "direct"
    assert "needs Triton, which is not installed (pip install 'hicache-core[kernel]'); using direct" in caplog.text
