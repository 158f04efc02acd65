"""A tiny llama-style decoder with random weights (seeded, no download): RMSNorm, rotary embeddings, grouped-query
attention over the paged device KV pool (full, or sliding-window on the layers the config says) or DeepSeek-V2's
multi-head latent attention (MLA: the pool keeps one latent vector per token and layer), SwiGLU.

Activations run in float64 by default and only K/V are rounded to the pool's dtype, so the result of a token does
not depend on how many rows a matmul had (prefill vs decode, batch size): a cached prefix and a recomputed one give
the same greedy tokens. That is what lets the benchmark check every cache configuration against the no-cache run.

``compute_dtype=float32`` (``--compute-dtype float32``) is the fast path: float32 weights and activations,
attention by ``scaled_dot_product_attention``, and on CPU each layer's projections as four oneDNN matmuls (q/k/v
fused, o, gate/up fused, down) instead of MKL's (see ``ops.onednn_linear_op``). A float32 matmul's rounding depends on
its shape, so a cached prefix and a recomputed one may differ in the last bits, and now and then in a greedy token
where two logits nearly tie: the benchmarks then report how many requests' tokens agree instead of requiring all.
Its pages carry the compute dtype in the model's fingerprint, apart from float64's.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from hicache_core.engine import mamba
from hicache_core.engine.model_config import COMPUTE, ModelConfig
from hicache_core.engine.ops import ONEDNN, dnn, keep_activations_in_heap, lin, rms, rope_inv_freq

ATTN_BLOCK = 64  # float32 attention: queries per scaled_dot_product_attention call
LATENT_EPS = 1e-6  # MLA's latent and query norms (DeepSeek-V2's, whatever rms_norm_eps says)

# float32 projections that run as one matmul each, their parts in this order along the output dimension
_FUSED = {"qkv": ("wq", "wk", "wv"), "wo": ("wo",), "gate_up": ("w_gate", "w_up"), "w_down": ("w_down",)}


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

        self.embed = w(c.vocab_size, c.hidden_size, scale=1.0)
        self.layers = [
            {
                "attn_norm": torch.ones(c.hidden_size, dtype=COMPUTE, device=self.device),
                **self._mixer_weights(i, w),
                "mlp_norm": torch.ones(c.hidden_size, dtype=COMPUTE, device=self.device),
                "w_gate": w(c.hidden_size, c.intermediate_size),
                "w_up": w(c.hidden_size, c.intermediate_size),
                "w_down": w(c.intermediate_size, c.hidden_size),
            }
            for i in range(c.num_layers)
        ]
        self.final_norm = torch.ones(c.hidden_size, dtype=COMPUTE, device=self.device)
        self.lm_head = w(c.hidden_size, c.vocab_size)
        self._cast()  # drawn in float64 whatever the compute dtype: the same model at every precision

    def _mixer_weights(self, layer: int, w: Any) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s attention weights (or its Mamba-2 mixer's), drawn in the order every model before
        the mixers was, so their weights stay what they were."""
        c = self.config
        if c.is_linear(layer):
            return mamba.random_weights(c, w, self.device)
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        attention = (
            self._mla_weights(w)
            if c.is_mla
            else {"wq": w(c.hidden_size, q), "wk": w(c.hidden_size, kv), "wv": w(c.hidden_size, kv)}
        )
        return {**attention, "wo": w(c.num_heads * (c.v_head_dim or c.head_dim), c.hidden_size)}

    def _mla_weights(self, w: Any) -> dict[str, torch.Tensor]:
        """One MLA layer's attention weights but ``wo``, by our names for DeepSeek-V2's (engine/checkpoint.py)."""
        c = self.config
        rank, rope, v = c.kv_lora_rank, c.rope_dim, c.v_head_dim
        assert rank is not None and v is not None
        q_out = c.num_heads * (c.head_dim + rope)
        ones = torch.ones(rank, dtype=COMPUTE, device=self.device)
        if c.q_lora_rank:
            qr = c.q_lora_rank
            ones_q = torch.ones(qr, dtype=COMPUTE, device=self.device)
            out = {"wq_a": w(c.hidden_size, qr), "q_norm": ones_q, "wq_b": w(qr, q_out)}
        else:
            out = {"wq": w(c.hidden_size, q_out)}
        return {
            **out,
            "w_kv_a": w(c.hidden_size, rank + rope),
            "kv_norm": ones,
            "w_kv_b": w(rank, c.num_heads * (c.head_dim + v)),
        }

    def _cast(self) -> None:
        """Every weight in the compute dtype."""
        to = self.dtype
        self.embed, self.final_norm, self.lm_head = (t.to(to) for t in (self.embed, self.final_norm, self.lm_head))
        self.layers = [{k: v.to(to) for k, v in p.items()} for p in self.layers]
        self._fused: Optional[list[dict]] = None
        plain = not self.config.is_mla and not self.config.has_mamba
        if to == torch.float32 and self.device.type == "cpu" and ONEDNN is not None and plain:
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
        """x: (T, heads, dim); rotate pairs by position * inv_freq: (first half, second half) as llama does, or,
        for MLA, neighbours (2i, 2i+1) as DeepSeek-V2 does. A partial rotary factor rotates the first ``rope_dim``
        dimensions only (Bamba's half) and passes the rest."""
        ang = positions.to(COMPUTE)[:, None] * self._inv_freq[None, :]  # angles in float64 at every precision
        cos, sin = ang.cos()[:, None, :].to(self.dtype), ang.sin()[:, None, :].to(self.dtype)
        if self.config.is_mla:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        r = 2 * self._inv_freq.shape[0]
        rest = x[..., r:]
        x1, x2 = x[..., : r // 2], x[..., r // 2 : r]
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Tensor parallel: sum the ranks' partial outputs (row-parallel o_proj and down_proj)."""
        if self.tp_shard:
            if self.tp_comm is not None and self.tp_comm.fits(partial):
                self.tp_comm.all_reduce_sum(partial)
                return partial
            import torch.distributed as dist

            dist.all_reduce(partial, group=self.tp_group)
        return partial

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        total: Optional[int] = None,
        window: Optional[int] = None,
    ) -> torch.Tensor:
        """One sequence's attention: its n new queries (n, hq, d), at the last n of its ``total`` positions, over
        the keys (T, hk, d) and values (T, hk, dv) of its last T positions (causal; T = total unless a window cut
        the older ones; default T). ``window``: each query sees only its last ``window`` keys, itself included.
        Returns (n, hq * dv)."""
        (n, hq, d), (t, hk), dv = q.shape, k.shape[:2], v.shape[-1]
        total = t if total is None else total
        qpos = torch.arange(total - n, total, device=q.device)[:, None]
        kpos = torch.arange(total - t, total, device=q.device)[None, :]
        allowed = kpos <= qpos  # (n, T): True where it may attend
        if window is not None:
            allowed &= kpos > qpos - window
        qi = q.transpose(0, 1)  # (hq, n, d)
        if self.dtype != COMPUTE:  # the fast path: one fused kernel, the KV heads shared by their query groups
            # with a batch dimension (4-D) torch takes its flash kernel on CPU; 3-D inputs fall back to the math
            # path (bmm, softmax, mask checks): SmolLM2-135M float32 512-token prefill 770 -> 690 ms on 2 cores
            ki, vi = (x.to(self.dtype).transpose(0, 1)[None] for x in (k, v))  # (1, hk, T, d)
            # in blocks of queries, each over the keys it may see: torch's CPU kernel does not skip the masked-out
            # keys of a long causal prefill (SmolLM2 512-token prefill 410-420 -> 373-395 ms)
            outs = []
            for s in range(0, n, ATTN_BLOCK):
                e = min(n, s + ATTN_BLOCK)
                end = t - n + e  # keys this block may see: up to its last query's position ...
                first = 0 if window is None else max(0, t - n + s - window + 1)  # ... from its first query's window
                outs.append(
                    torch.nn.functional.scaled_dot_product_attention(
                        qi[None, :, s:e],
                        ki[:, :, first:end],
                        vi[:, :, first:end],
                        attn_mask=allowed[s:e, first:end],
                        enable_gqa=hq != hk,
                    )[0]
                )
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
            return out.transpose(0, 1).reshape(n, hq * dv)
        ki = k.to(COMPUTE).transpose(0, 1).repeat_interleave(hq // hk, 0)  # (hq, T, d)
        vi = v.to(COMPUTE).transpose(0, 1).repeat_interleave(hq // hk, 0)
        scores = (qi @ ki.transpose(1, 2)) * d**-0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        return (scores.softmax(-1) @ vi).transpose(0, 1).reshape(n, hq * dv)

    def _mla(self, pool, layer_id: int, p: dict, h: torch.Tensor, positions, new_slots, seqs) -> torch.Tensor:
        """One MLA layer's attention (DeepSeek-V2): the new tokens' latents (normed) and rotary keys go to the pool
        as one vector each; every sequence's cached latents are expanded into its heads' keys and values by
        ``w_kv_b`` (the plain, unabsorbed form). Returns (tokens, heads * v_head_dim)."""
        c = self.config
        hq, nope, rope, rank = c.num_heads, c.head_dim, c.rope_dim, c.kv_lora_rank
        assert rank is not None
        if "wq_a" in p:
            q = lin(rms(lin(h, p, "wq_a"), p["q_norm"], LATENT_EPS), p, "wq_b")
        else:
            q = lin(h, p, "wq")
        q = q.view(-1, hq, nope + rope)
        q = torch.cat([q[..., :nope], self._rope(q[..., nope:], positions)], dim=-1)
        kv_a = lin(h, p, "w_kv_a")
        latent = torch.cat(
            [rms(kv_a[:, :rank], p["kv_norm"], LATENT_EPS), self._rope(kv_a[:, None, rank:], positions)[:, 0]], -1
        )
        pool.wait_layer(layer_id)
        pool.set_kv(layer_id, new_slots, latent[:, None, :])
        outs, start = [], 0
        for tokens, _, all_slots in seqs:
            n = len(tokens)
            cached = pool.read_kv(layer_id, all_slots.to(pool.device))[0][:, 0].to(self.dtype)  # (T, rank + rope)
            kv = lin(cached[:, :rank], p, "w_kv_b").view(-1, hq, nope + (c.v_head_dim or nope))
            keys = torch.cat([kv[..., :nope], cached[:, None, rank:].expand(-1, hq, rope)], dim=-1)
            outs.append(self._attend(q[start : start + n], keys, kv[..., nope:], len(all_slots)))
            start += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _mlp(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """A layer's SwiGLU MLP on its normed input (the unfused path), summed over the ranks."""
        h = rms(x, p["mlp_norm"], self.config.rms_eps)
        return self._reduce(lin(torch.nn.functional.silu(lin(h, p, "w_gate")) * lin(h, p, "w_up"), p, "w_down"))

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
            h = rms(x, p["attn_norm"], c.rms_eps)
            if c.is_mla or c.is_linear(layer_id):
                if c.is_mla:
                    x = x + self._reduce(lin(self._mla(pool, layer_id, p, h, positions, new_slots, seqs), p, "wo"))
                else:  # a Mamba-2 mixer (engine/mamba.py; tensor parallel is refused for these models)
                    x = x + mamba.mix(self, pool, layer_id, p, h, seqs)
                x = x + self._mlp(x, p)
                continue
            if fused is not None:
                qkv = dnn(h, fused[layer_id]["qkv"])
                q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
                q = self._rope(q.reshape(-1, hq, d), positions)
                k = self._rope(k.reshape(-1, hk, d), positions)
                v = v.reshape(-1, hk, d)
            else:
                q = self._rope(lin(h, p, "wq").view(-1, hq, d), positions)
                k = self._rope(lin(h, p, "wk").view(-1, hk, d), positions)
                v = lin(h, p, "wv").view(-1, hk, d)
            pool.wait_layer(layer_id)  # this layer of a load in flight has landed
            pool.set_kv(layer_id, new_slots, k, v)
            outs, start = [], 0
            window = c.window(layer_id)
            for (_, _, all_slots), n in zip(seqs, lens):
                total = len(all_slots)
                if window is not None:  # a windowed layer reads only the keys its new queries can see
                    all_slots = all_slots[max(0, total - n - window + 1) :]
                keys, values = pool.read_kv(layer_id, all_slots.to(pool.device))
                outs.append(self._attend(q[start : start + n], keys, values, total, window))
                start += n
            attn = torch.cat(outs) if len(outs) > 1 else outs[0]
            if fused is not None:
                f = fused[layer_id]
                x = x + self._reduce(dnn(attn, f["wo"]))
                h = rms(x, p["mlp_norm"], c.rms_eps)
                gate, up = dnn(h, f["gate_up"]).chunk(2, dim=-1)
                x = x + self._reduce(dnn(torch.nn.functional.silu(gate) * up, f["w_down"]))
                continue
            x = x + self._reduce(lin(attn, p, "wo"))
            x = x + self._mlp(x, p)
        last = torch.tensor(lens, device=self.device).cumsum(0) - 1
        h = rms(x[last], self.final_norm, c.rms_eps)
        if fused is not None:
            return dnn(h, (self._lm_head_t, None))
        return h @ self.lm_head
