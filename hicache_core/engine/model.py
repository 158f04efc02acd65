"""A tiny llama-style decoder with random weights (seeded, no download): RMSNorm, rotary embeddings, grouped-query
attention over the paged device KV pool, SwiGLU.

Activations run in float64 by default and only K/V are rounded to the pool's dtype, so the result of a token does
not depend on how many rows a matmul had (prefill vs decode, batch size): a cached prefix and a recomputed one give
the same greedy tokens. That is what lets the benchmark check every cache configuration against the no-cache run.

``compute_dtype=float32`` (``--compute-dtype float32``) is the fast path: float32 weights and activations,
attention by ``scaled_dot_product_attention``, and on CPU each layer's projections as four oneDNN matmuls (q/k/v
fused, o, gate/up fused, down) instead of MKL's (see ``_onednn_linear_op``). A float32 matmul's rounding depends on
its shape, so a cached prefix and a recomputed one may differ in the last bits, and now and then in a greedy token
where two logits nearly tie: the benchmarks then report how many requests' tokens agree instead of requiring all.
Its pages carry the compute dtype in the model's fingerprint, apart from float64's.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Optional

import attrs
import torch

from hicache_core.memory import KVSpec

COMPUTE = torch.float64  # the default compute dtype (bit-stable across batch shapes)
COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@attrs.frozen(kw_only=True)
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 384
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1024
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    seed: int = 0
    kv_dtype: torch.dtype = torch.bfloat16
    compute_dtype: torch.dtype = COMPUTE  # weights and activations (float64, or float32: see the module doc)
    max_position_embeddings: int = 1 << 20
    # llama3 / linear rope scaling from a checkpoint's config.json (None: plain rotary)
    rope_scaling: Optional[dict] = attrs.field(default=None, eq=False, hash=False)
    checkpoint: Optional[str] = None  # the model directory it was loaded from (its name is then the model's)
    # the checkpoint's content digest (hicache_core/identity.py); None for the random model
    content_digest: Optional[str] = attrs.field(default=None, eq=False, hash=False)

    def kv_spec(self) -> KVSpec:
        return KVSpec(
            layer_num=self.num_layers, head_num=self.num_kv_heads, head_dim=self.head_dim, dtype=self.kv_dtype
        )

    @property
    def fingerprint(self) -> str:
        """The weights' identity for the storage namespace: the checkpoint's content digest, or the random
        model's seed and shape."""
        from hicache_core.identity import random_fingerprint

        base = self.content_digest or random_fingerprint(
            {
                f.name: getattr(self, f.name)
                for f in attrs.fields(ModelConfig)
                if f.name not in ("kv_dtype", "content_digest", "checkpoint", "compute_dtype")
            }
        )
        if self.compute_dtype == COMPUTE:
            return base
        return f"{base}+act-{str(self.compute_dtype).replace('torch.', '')}"  # its KV differs in the last bits

    @property
    def name(self) -> str:
        if self.checkpoint:
            return self.checkpoint
        return (
            f"tiny-llama-h{self.hidden_size}-l{self.num_layers}-q{self.num_heads}-kv{self.num_kv_heads}"
            f"-d{self.head_dim}-seed{self.seed}"
        )


# the random model's shape as command-line flags: (flag, ModelConfig field, what); `hicache bench multiturn` and
# `hicache serve` both take them, so a served random model can be the benchmark's own
SHAPE_FLAGS = (
    ("--hidden-size", "hidden_size", "model width"),
    ("--intermediate-size", "intermediate_size", "MLP width"),
    ("--num-layers", "num_layers", "layers"),
    ("--num-heads", "num_heads", "attention heads"),
    ("--num-kv-heads", "num_kv_heads", "KV heads"),
    ("--head-dim", "head_dim", "head dimension"),
    ("--vocab-size", "vocab_size", "vocabulary"),
)


def shape_from_args(args: Any) -> dict[str, Any]:
    """The SHAPE_FLAGS given in ``args`` (None: not given), as ModelConfig fields."""
    return {f: getattr(args, f) for _, f, _ in SHAPE_FLAGS if getattr(args, f, None) is not None}


def _lin(x: torch.Tensor, p: dict, name: str) -> torch.Tensor:
    y = x @ p[name]
    b = p.get(name + "_b")
    return y if b is None else y + b


def _onednn_linear_op() -> Any:
    """oneDNN's matmul as torch exposes it (``mkldnn::_linear_pointwise``: ``x @ w.T + b`` with ``w`` as (out, in)),
    or None where this torch build lacks it or it gives a wrong answer on a probe.

    Why: torch's float32 ``mm`` on CPU is MKL's sgemm, which on AMD CPUs runs its AVX2 kernels. On this project's
    machines (2 cores of an AMD EPYC, AVX-512) MKL reaches 210 GF/s and oneDNN 510 (SmolLM2's 512 x 576 x 3072
    MLP matmul: 7.7 ms vs 3.4 ms); vLLM's CPU backend uses oneDNN for the same reason. Same float32 arithmetic
    (no reduced precision), only another summation order."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return None
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((5, 24), (40, 24), (40,)))
        got = op(x, w, b, "none", [], "")
        if not torch.allclose(got, x @ w.T + b, rtol=1e-4, atol=1e-4):
            return None
    except (RuntimeError, TypeError):  # an op of another signature in some torch build
        return None
    return op


_ONEDNN: Any = _onednn_linear_op()


def _dnn(x: torch.Tensor, wb: tuple[torch.Tensor, Optional[torch.Tensor]]) -> torch.Tensor:
    """``x @ w.T + b`` by oneDNN, for a fused (weight, bias) of ``TinyLlama._fuse``."""
    return _ONEDNN(x, wb[0], wb[1], "none", [], "")


ATTN_BLOCK = 64  # float32 attention: queries per scaled_dot_product_attention call

# float32 projections that run as one matmul each, their parts in this order along the output dimension
_FUSED = {"qkv": ("wq", "wk", "wv"), "wo": ("wo",), "gate_up": ("w_gate", "w_up"), "w_down": ("w_down",)}


_HEAP_KEPT = False


def keep_activations_in_heap() -> None:
    """Have glibc serve allocations up to 32 MiB from its heap and keep freed memory there (``mallopt``), once a
    process, unless ``$HICACHE_MALLOC_TUNE=0`` or the ``MALLOC_*`` variables already say otherwise.

    glibc's default hands an activation of more than a few hundred KiB out by ``mmap`` and gives it back on free, so
    each op's output is fresh memory, faulted in 4 KiB at a time: 15,000-25,000 page faults in a 512-token
    SmolLM2 float32 prefill, ~100 of its 480 ms on 2 cores (with it: 0 faults, 370 ms); float64 took 410,000
    faults and 1650 ms (with it: 1280 ms). The cost is freed memory the process keeps for its next forward pass: up
    to 256 MiB at the heap's top before glibc trims it."""
    global _HEAP_KEPT
    if _HEAP_KEPT:
        return
    _HEAP_KEPT = True
    if os.environ.get("HICACHE_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return
    if any(k.startswith("MALLOC_") and k.endswith("THRESHOLD_") for k in os.environ):
        return  # the user tuned malloc
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return  # not glibc (musl has no such thresholds)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):
        return


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_inv_freq(c: ModelConfig) -> torch.Tensor:
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=COMPUTE) / c.head_dim))
    rs = c.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv = inv / float(rs["factor"])
    elif kind == "llama3":  # long-context scaling of Llama 3.1: low frequencies slowed, a smooth band between
        factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        wavelen = 2 * torch.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported (plain, linear and llama3 are)")
    return inv


class TinyLlama:
    """Weights and the forward pass. ``forward`` reads and writes K/V through a :class:`DevicePool`.

    Without ``weights`` they are random (seeded); a checkpoint gives them by our names (see
    :mod:`hicache_core.engine.checkpoint`): matrices as ``x @ w``, optional biases ``<name>_b``."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", weights: Optional[dict] = None) -> None:
        self.config = c = config
        self.device = torch.device(device)
        self.dtype = c.compute_dtype
        self._inv_freq = rope_inv_freq(c).to(self.device)
        self.tp_shard = False  # a rank's shard (engine/tp.py): partial outputs are summed over tp_group
        self.tp_group: Any = None  # None: the default group
        self.tp_comm: Any = None  # the ranks' shared-memory all-reduce (engine/shm.py), when they have one
        if self.device.type == "cpu":
            keep_activations_in_heap()
        if weights is not None:
            self.embed, self.layers = weights["embed"], weights["layers"]
            self.final_norm, self.lm_head = weights["final_norm"], weights["lm_head"]
            self._cast()
            return
        g = torch.Generator().manual_seed(c.seed)

        def w(*shape: int, scale: Optional[float] = None) -> torch.Tensor:
            s = scale if scale is not None else shape[0] ** -0.5
            return (torch.randn(*shape, generator=g, dtype=COMPUTE) * s).to(self.device)

        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.embed = w(c.vocab_size, c.hidden_size, scale=1.0)
        self.layers = [
            {
                "attn_norm": torch.ones(c.hidden_size, dtype=COMPUTE, device=self.device),
                "wq": w(c.hidden_size, q),
                "wk": w(c.hidden_size, kv),
                "wv": w(c.hidden_size, kv),
                "wo": w(q, c.hidden_size),
                "mlp_norm": torch.ones(c.hidden_size, dtype=COMPUTE, device=self.device),
                "w_gate": w(c.hidden_size, c.intermediate_size),
                "w_up": w(c.hidden_size, c.intermediate_size),
                "w_down": w(c.intermediate_size, c.hidden_size),
            }
            for _ in range(c.num_layers)
        ]
        self.final_norm = torch.ones(c.hidden_size, dtype=COMPUTE, device=self.device)
        self.lm_head = w(c.hidden_size, c.vocab_size)
        self._cast()  # drawn in float64 whatever the compute dtype: the same model at every precision

    def _cast(self) -> None:
        """Every weight in the compute dtype."""
        to = self.dtype
        self.embed, self.final_norm, self.lm_head = (t.to(to) for t in (self.embed, self.final_norm, self.lm_head))
        self.layers = [{k: v.to(to) for k, v in p.items()} for p in self.layers]
        self._fused: Optional[list[dict]] = None
        if to == torch.float32 and self.device.type == "cpu" and _ONEDNN is not None:
            self._fuse()

    def _fuse(self) -> None:
        """float32 on CPU: each layer's projections as oneDNN wants them, (out, in) contiguous, q/k/v and gate/up
        each one matrix (one call, one pass over the input). ``self.layers`` then holds views into them, so the
        weights are not held twice."""
        self._fused = []
        for p in self.layers:
            f = {}
            for name, parts in _FUSED.items():
                w = torch.cat([p[k].T for k in parts]) if len(parts) > 1 else p[parts[0]].T.contiguous()
                biases = [p.get(k + "_b") for k in parts]
                b = None
                if any(x is not None for x in biases):
                    b = torch.cat([x if x is not None else w.new_zeros(p[k].shape[1]) for k, x in zip(parts, biases)])
                f[name] = (w, b)
                start = 0
                for k in parts:  # the per-name weights become views of the fused ones
                    n = p[k].shape[1]
                    p[k] = w[start : start + n].T
                    start += n
            self._fused.append(f)
        self._lm_head_t = self.lm_head.T.contiguous()  # tied embeddings: the embedding matrix itself, no copy
        self.lm_head = self._lm_head_t.T

    def with_compute_dtype(self, dtype: torch.dtype) -> TinyLlama:
        """The same model computing in ``dtype`` (weights cast; a no-op when it already does)."""
        if dtype == self.dtype:
            return self
        weights = {"embed": self.embed, "layers": self.layers, "final_norm": self.final_norm, "lm_head": self.lm_head}
        other = TinyLlama(attrs.evolve(self.config, compute_dtype=dtype), self.device, weights=weights)
        other.tp_shard, other.tp_group, other.tp_comm = self.tp_shard, self.tp_group, self.tp_comm
        return other

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (T, heads, dim); rotate pairs (first half, second half) by position * inv_freq."""
        ang = positions.to(COMPUTE)[:, None] * self._inv_freq[None, :]  # angles in float64 at every precision
        cos, sin = ang.cos()[:, None, :].to(self.dtype), ang.sin()[:, None, :].to(self.dtype)
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Tensor parallel: sum the ranks' partial outputs (row-parallel o_proj and down_proj)."""
        if self.tp_shard:
            if self.tp_comm is not None and self.tp_comm.fits(partial):
                self.tp_comm.all_reduce_sum(partial)
                return partial
            import torch.distributed as dist

            dist.all_reduce(partial, group=self.tp_group)
        return partial

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One sequence's attention: its n new queries (n, hq, d) over all its T keys and values (T, hk, d), the
        queries at the last n positions (causal). Returns (n, hq * d)."""
        c = self.config
        n, total, hq, hk, d = q.shape[0], k.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        qpos = torch.arange(total - n, total, device=q.device)[:, None]
        causal = torch.arange(total, device=q.device)[None, :] <= qpos  # (n, T): True where it may attend
        qi = q.transpose(0, 1)  # (hq, n, d)
        if self.dtype != COMPUTE:  # the fast path: one fused kernel, the KV heads shared by their query groups
            # with a batch dimension (4-D) torch takes its flash kernel on CPU; 3-D inputs fall back to the math
            # path (bmm, softmax, mask checks): SmolLM2-135M float32 512-token prefill 770 -> 690 ms on 2 cores
            ki, vi = (t.to(self.dtype).transpose(0, 1)[None] for t in (k, v))  # (1, hk, T, d)
            # in blocks of queries, each over the keys up to its last position: torch's CPU kernel does not skip
            # the masked-out keys of a long causal prefill (SmolLM2 512-token prefill 410-420 -> 373-395 ms)
            outs = []
            for s in range(0, n, ATTN_BLOCK):
                e = min(n, s + ATTN_BLOCK)
                end = total - n + e  # keys this block may see
                outs.append(
                    torch.nn.functional.scaled_dot_product_attention(
                        qi[None, :, s:e],
                        ki[:, :, :end],
                        vi[:, :, :end],
                        attn_mask=causal[s:e, :end],
                        enable_gqa=hq != hk,
                    )[0]
                )
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
            return out.transpose(0, 1).reshape(n, hq * d)
        ki = k.to(COMPUTE).transpose(0, 1).repeat_interleave(hq // hk, 0)  # (hq, T, d)
        vi = v.to(COMPUTE).transpose(0, 1).repeat_interleave(hq // hk, 0)
        scores = (qi @ ki.transpose(1, 2)) * d**-0.5
        scores = scores.masked_fill(~causal, float("-inf"))
        return (scores.softmax(-1) @ vi).transpose(0, 1).reshape(n, hq * d)

    def forward(self, pool, seqs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One step for several sequences. Each entry: (new token ids, their slots, all slots so far incl. new).

        New tokens sit at positions ``len(all) - len(new) ...``; they attend to every slot in ``all`` before them.
        Returns the logits of each sequence's last new token, (len(seqs), vocab).
        """
        c = self.config
        tokens = torch.cat([s[0] for s in seqs]).to(self.device)
        lens = [len(s[0]) for s in seqs]
        positions = torch.cat([torch.arange(len(a) - len(t), len(a)) for t, _, a in seqs]).to(self.device)
        new_slots = torch.cat([s[1] for s in seqs]).to(pool.device)
        x = self.embed[tokens]
        hq, hk, d = c.num_heads, c.num_kv_heads, c.head_dim
        fused = self._fused
        for layer_id, p in enumerate(self.layers):
            h = _rms(x, p["attn_norm"], c.rms_eps)
            if fused is not None:
                qkv = _dnn(h, fused[layer_id]["qkv"])
                q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
                q = self._rope(q.reshape(-1, hq, d), positions)
                k = self._rope(k.reshape(-1, hk, d), positions)
                v = v.reshape(-1, hk, d)
            else:
                q = self._rope(_lin(h, p, "wq").view(-1, hq, d), positions)
                k = self._rope(_lin(h, p, "wk").view(-1, hk, d), positions)
                v = _lin(h, p, "wv").view(-1, hk, d)
            k_buf, v_buf = pool.get_kv_buffer(layer_id)  # waits for this layer of a load in flight
            k_buf[new_slots] = k.to(pool.dtype)
            v_buf[new_slots] = v.to(pool.dtype)
            outs, start = [], 0
            for (_, _, all_slots), n in zip(seqs, lens):
                idx = all_slots.to(pool.device)
                outs.append(self._attend(q[start : start + n], k_buf[idx], v_buf[idx]))
                start += n
            attn = torch.cat(outs) if len(outs) > 1 else outs[0]
            if fused is not None:
                f = fused[layer_id]
                x = x + self._reduce(_dnn(attn, f["wo"]))
                h = _rms(x, p["mlp_norm"], c.rms_eps)
                gate, up = _dnn(h, f["gate_up"]).chunk(2, dim=-1)
                x = x + self._reduce(_dnn(torch.nn.functional.silu(gate) * up, f["w_down"]))
                continue
            x = x + self._reduce(_lin(attn, p, "wo"))
            h = _rms(x, p["mlp_norm"], c.rms_eps)
            x = x + self._reduce(_lin(torch.nn.functional.silu(_lin(h, p, "w_gate")) * _lin(h, p, "w_up"), p, "w_down"))
        last = torch.tensor(lens, device=self.device).cumsum(0) - 1
        h = _rms(x[last], self.final_norm, c.rms_eps)
        if fused is not None:
            return _dnn(h, (self._lm_head_t, None))
        return h @ self.lm_head
