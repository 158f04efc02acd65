"""Mamba-2 mixers (Bamba's ``linear_attention`` layers) in the reference engine, and where their state lives.

A Mamba layer keeps no K/V: after each token it has a recurrent state (``mamba_heads x mamba_head_dim x
mamba_state``) and the last ``mamba_conv - 1`` inputs of its causal convolution. The engine keeps that state *in
the page*: a Mamba layer's share of a page (the K and V slots it would have as an attention layer) holds, as float32
bytes, the layer's state after the page's last token. So every page-aligned prefix carries what is needed to resume
after it, and the cache needs nothing new: the radix tree matches pages, the host and storage tiers move pages as
bytes, and a hit on any tier restores the state with the KV (``KVSpec.kv_format`` MAMBA_STATE: the fp8 codec refuses
such pages). The cost is that the state must fit a page's share (``check_fits``); SGLang instead keeps one state
slot per request and snapshots it at radix nodes (docs/sglang.md).

The state is float32 after every token, whatever the compute dtype (transformers keeps it in float32 too), so the
result does not depend on where a prefill started: a warm prefix and a recomputed one give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from hicache_core.engine.model_config import COMPUTE, FULL, LINEAR, ModelConfig
from hicache_core.engine.ops import lin
from hicache_core.errors import ConfigError

STATE_DTYPE = torch.float32


def dims(c: ModelConfig) -> tuple[int, int, int, int, int]:
    """(heads, head channels, groups, state width, conv width) of ``c``'s Mamba layers."""
    assert c.mamba_heads and c.mamba_head_dim and c.mamba_groups and c.mamba_state and c.mamba_conv
    return c.mamba_heads, c.mamba_head_dim, c.mamba_groups, c.mamba_state, c.mamba_conv


def conv_dim(c: ModelConfig) -> int:
    """Channels of the causal convolution: the mixer's input x (heads x head channels) and its B and C."""
    h, p, g, n, _ = dims(c)
    return h * p + 2 * g * n


def state_values(c: ModelConfig) -> int:
    """float32 values of one layer's state: the convolution's last inputs, then the recurrent state."""
    h, p, _, n, k = dims(c)
    return (k - 1) * conv_dim(c) + h * p * n


def check_fits(c: ModelConfig, page_size: int) -> None:
    """ConfigError unless a Mamba layer's state fits its share of a ``page_size``-token page."""
    if not c.has_mamba:
        return
    spec = c.kv_spec()
    share = 2 * page_size * spec.head_num * spec.head_dim * spec.itemsize
    need = 4 * state_values(c)
    if need > share:
        pages = -(-need // (2 * spec.head_num * spec.head_dim * spec.itemsize))
        raise ConfigError(
            f"{c.name}: a Mamba layer's state is {need} bytes (float32) and must fit its share of a page, "
            f"{share} bytes at --page-size {page_size} ({spec.head_num} KV heads x {spec.head_dim} x K and V, "
            f"{str(spec.dtype).replace('torch.', '')}); use --page-size {pages} or more"
        )


def random_weights(c: ModelConfig, w: Callable[..., torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """One Mamba layer's weights, random (``w`` draws a matrix), by our names (see ``checkpoint_tensors``)."""
    h, p, _, _, k = dims(c)
    inner = h * p
    return {
        "m_in": w(c.hidden_size, inner + conv_dim(c) + h),
        "m_conv": w(conv_dim(c), k, scale=k**-0.5),
        "m_conv_b": torch.zeros(conv_dim(c), dtype=COMPUTE, device=device),
        "m_dt_bias": torch.ones(h, dtype=COMPUTE, device=device),
        "m_A_log": torch.log(torch.arange(1, h + 1, dtype=COMPUTE, device=device)),
        "m_D": torch.ones(h, dtype=COMPUTE, device=device),
        "m_norm": torch.ones(inner, dtype=COMPUTE, device=device),
        "m_out": w(inner, c.hidden_size),
    }


def _region(all_slots: torch.Tensor, position: int, page_size: int) -> torch.Tensor:
    """The slots of the page holding the token at ``position``."""
    slot = int(all_slots[position])
    return torch.arange(slot - slot % page_size, slot - slot % page_size + page_size)


def _write(pool: Any, layer_id: int, region: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor) -> None:
    spec, n = pool.spec, len(region)
    half = n * spec.head_num * spec.head_dim * spec.itemsize
    raw = torch.cat([conv.reshape(-1), ssm.reshape(-1)]).to(STATE_DTYPE).view(torch.uint8)
    buf = torch.zeros(2 * half, dtype=torch.uint8, device=pool.device)
    buf[: raw.numel()] = raw.to(pool.device)
    shape = (n, spec.head_num, spec.head_dim)
    pool.set_kv(
        layer_id,
        region.to(pool.device),
        buf[:half].view(spec.dtype).view(shape),
        buf[half:].view(spec.dtype).view(shape),
    )


def _read(pool: Any, layer_id: int, region: torch.Tensor, c: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = pool.read_kv(layer_id, region.to(pool.device))
    raw = torch.cat([k.contiguous().view(-1).view(torch.uint8), v.contiguous().view(-1).view(torch.uint8)])
    values = raw[: 4 * state_values(c)].view(STATE_DTYPE)
    h, p, _, n, kw = dims(c)
    split = (kw - 1) * conv_dim(c)
    return values[:split].view(kw - 1, conv_dim(c)), values[split:].view(h, p, n)


def mix(model: Any, pool: Any, layer_id: int, p: dict, h: torch.Tensor, seqs: list) -> torch.Tensor:
    """One Mamba-2 layer over every sequence's new tokens (as transformers' Bamba mixer: in_proj, causal conv and
    SiLU, the selective scan with its D skip, the gated group RMSNorm, out_proj). Each sequence resumes from the
    state in the page of its last cached token and leaves its state in the page of each token that ends a page and
    of its last one. Returns (tokens, hidden)."""
    c, dtype, ps = model.config, model.dtype, pool.page_size
    heads, hp, groups, n_state, kw = dims(c)
    inner, cd = heads * hp, conv_dim(c)
    gate, xbc, dt_raw = lin(h, p, "m_in").split([inner, cd, heads], dim=-1)
    xbc = xbc.to(STATE_DTYPE).to(dtype)  # the convolution's inputs as its state keeps them
    a = -torch.exp(p["m_A_log"])
    pool.wait_layer(layer_id)
    outs, start = [], 0
    for tokens, _, all_slots in seqs:
        n = len(tokens)
        cached = len(all_slots) - n
        if cached:
            conv_state, ssm = (x.to(dtype) for x in _read(pool, layer_id, _region(all_slots, cached - 1, ps), c))
        else:
            conv_state = torch.zeros(kw - 1, cd, dtype=dtype, device=h.device)
            ssm = torch.zeros(heads, hp, n_state, dtype=dtype, device=h.device)
        inputs = torch.cat([conv_state.to(h.device), xbc[start : start + n]])  # (kw - 1 + n, conv channels)
        conv = (inputs.unfold(0, kw, 1) * p["m_conv"]).sum(-1)
        if "m_conv_b" in p:
            conv = conv + p["m_conv_b"]
        x, b, cm = torch.nn.functional.silu(conv).split([inner, groups * n_state, groups * n_state], dim=-1)
        dt = torch.nn.functional.softplus(dt_raw[start : start + n] + p["m_dt_bias"])  # (n, heads)
        decay = torch.exp(dt * a)
        x = x.view(n, heads, hp)
        b = b.view(n, groups, n_state).repeat_interleave(heads // groups, dim=1)  # (n, heads, state)
        cm = cm.view(n, groups, n_state).repeat_interleave(heads // groups, dim=1)
        y = torch.empty(n, heads, hp, dtype=dtype, device=h.device)
        ssm = ssm.to(h.device)
        for t in range(n):
            ssm = ssm * decay[t, :, None, None] + (dt[t, :, None, None] * x[t, :, :, None]) * b[t, :, None, :]
            ssm = ssm.to(STATE_DTYPE).to(dtype)
            y[t] = (ssm @ cm[t, :, :, None])[..., 0] + p["m_D"][:, None] * x[t]
            pos = cached + t
            if (pos + 1) % ps == 0 or t == n - 1:  # the state after a page's last token (or the last one) stays in it
                _write(pool, layer_id, _region(all_slots, pos, ps), inputs[t + 1 : t + kw], ssm)
        g = y.reshape(n, inner) * torch.nn.functional.silu(gate[start : start + n])
        g = g.view(n, groups, inner // groups)
        g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + c.rms_eps)).view(n, inner) * p["m_norm"]
        outs.append(lin(g, p, "m_out"))
        start += n
    return torch.cat(outs) if len(outs) > 1 else outs[0]


# --- Bamba checkpoints (engine/checkpoint.py) ---------------------------------------------------------------------
def bamba_fields(cfg: dict, where: Path) -> dict[str, Any]:
    """A Bamba config.json's Mamba fields as ModelConfig's: its layer types (attn_layer_indices: the full-attention
    layers, the rest Mamba-2), its mixer's shape and its partial rotary factor. What would change the math and is
    not followed is refused, naming the key."""
    n = int(cfg["num_hidden_layers"])
    attn = cfg.get("attn_layer_indices") or []
    if not isinstance(attn, list) or any(not isinstance(i, int) or not 0 <= i < n for i in attn):
        raise ConfigError(f"--model-path: {where}: attn_layer_indices={attn!r} must list layer numbers 0..{n - 1}")
    limit = cfg.get("time_step_limit")
    # transformers writes infinity as {"__float__": "Infinity"}
    bounds = [float(v["__float__"]) if isinstance(v, dict) else float(v) for v in (limit or [0.0, "inf"])]
    if bounds != [0.0, float("inf")]:
        raise ConfigError(
            f"--model-path: {where}: time_step_limit={limit!r} is not supported (only the default [0, inf])"
        )
    hidden, heads = int(cfg["hidden_size"]), int(cfg["mamba_n_heads"])
    head_dim = cfg.get("mamba_d_head", "auto")
    head_dim = int(cfg.get("mamba_expand", 2)) * hidden // heads if head_dim == "auto" else int(head_dim)
    return {
        "layer_types": tuple(FULL if i in attn else LINEAR for i in range(n)),
        "mamba_heads": heads,
        "mamba_head_dim": head_dim,
        "mamba_groups": int(cfg.get("mamba_n_groups", 1)),
        "mamba_state": int(cfg["mamba_d_state"]),
        "mamba_conv": int(cfg.get("mamba_d_conv", 4)),
    }


def checkpoint_tensors(c: ModelConfig, take: Callable[..., Any], pre: str) -> dict[str, torch.Tensor]:
    """One Bamba Mamba layer's weights by our names from its Hugging Face tensors (``take(name, shape,
    transpose=False, optional=False)``, every shape checked)."""
    heads, hp, _, _, kw = dims(c)
    inner, cd, hidden = heads * hp, conv_dim(c), c.hidden_size
    m = pre + "mamba."
    out: dict[str, Optional[torch.Tensor]] = {
        "m_in": take(m + "in_proj.weight", (inner + cd + heads, hidden), transpose=True),
        "m_in_b": take(m + "in_proj.bias", (inner + cd + heads,), optional=True),
        "m_conv": take(m + "conv1d.weight", (cd, 1, kw))[:, 0].contiguous(),
        "m_conv_b": take(m + "conv1d.bias", (cd,), optional=True),
        "m_dt_bias": take(m + "dt_bias", (heads,)),
        "m_A_log": take(m + "A_log", (heads,)),
        "m_D": take(m + "D", (heads,)),
        "m_norm": take(m + "norm.weight", (inner,)),
        "m_out": take(m + "out_proj.weight", (hidden, inner), transpose=True),
        "m_out_b": take(m + "out_proj.bias", (hidden,), optional=True),
    }
    return {k: v for k, v in out.items() if v is not None}
