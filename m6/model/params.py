"""Closed-form parameter and training-FLOP counts for any ModelConfig, cross-checkable on the meta device."""

from __future__ import annotations

from m6.config import ModelConfig


def _patch_encoder_params(cfg: ModelConfig) -> int:
    # Mirrors m6.model.m6.PatchEncoder: two 3x3 convs (the first strided when the patch side is even),
    # a patchifying conv to d_model and the global-token projection.
    D, p = cfg.d_model, cfg.patch_size
    c = max(16, min(64, D // 2))
    stride = 2 if p % 2 == 0 else 1
    k = p // stride
    return (3 * c * 9 + c) + (c * c * 9 + c) + (c * D * k * k + D) + (c * D + D)


def _block_params(cfg: ModelConfig, moe: bool) -> tuple[int, int, int]:
    """(total, expert, expert-per-token) parameters of one block."""
    D = cfg.d_model
    attn = 2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D  # ln1, qkv, proj, ln2
    if not moe:
        return attn + (D * cfg.d_ff + cfg.d_ff) + (cfg.d_ff * D + D), 0, 0
    per_expert = 2 * D * cfg.expert_d_ff
    experts = cfg.num_experts * per_expert
    k = cfg.top_k * cfg.num_prototypes
    return attn + cfg.num_experts * D + experts, experts, k * per_expert


def count_params(cfg: ModelConfig) -> dict:
    """Total, active and training-FLOP figures of an M6Model built from ``cfg``.

    Returns:
        ``total``: stored parameters (the real module has exactly this many; shared
        layers are stored once). ``active``: parameters a text token touches, i.e.
        total minus the experts it is not routed to. ``expert``: parameters in
        experts. ``train_flops_per_token``: 6·(matmul parameters applied per token
        over the full depth, LM head included) + 6·n_layers·ctx·d for attention
        scores (Kaplan et al., arXiv 2001.08361, Table 1), with ctx = image tokens
        (patches + the global token) + max_text_len; shared layers count once per use.
    """
    D = cfg.d_model
    period = cfg.moe_every if cfg.moe_every > 0 else 1
    unique = range(min(period, cfg.n_layers)) if cfg.share_layers else range(cfg.n_layers)
    blocks_total = blocks_expert = blocks_inactive = 0
    for i in unique:
        tot, exp, per_tok = _block_params(cfg, cfg.is_moe_layer(i))
        blocks_total += tot
        blocks_expert += exp
        blocks_inactive += exp - per_tok
    embed = cfg.vocab_size * D + cfg.max_text_len * D + 3 * D + cfg.num_image_tokens * D
    pools = 2 * (4 * D * D + 7 * D) + 2 * D  # image/text attention pooling (query, MHA, LN); image skip LN
    heads = pools + 2 * D * cfg.contrastive_dim + 1
    total = _patch_encoder_params(cfg) + embed + blocks_total + 2 * D + heads

    matmul_per_token = cfg.vocab_size * D  # tied LM head
    for i in range(cfg.n_layers):
        matmul_per_token += 4 * D * D
        if cfg.is_moe_layer(i):
            matmul_per_token += cfg.num_experts * D + cfg.top_k * cfg.num_prototypes * 2 * D * cfg.expert_d_ff
        else:
            matmul_per_token += 2 * D * cfg.d_ff
    ctx = cfg.num_image_tokens + cfg.max_text_len
    flops = 6 * matmul_per_token + 6 * cfg.n_layers * ctx * D
    return {
        "total": total,
        "active": total - blocks_inactive,
        "expert": blocks_expert,
        "train_flops_per_token": flops,
    }


def meta_param_count(cfg: ModelConfig) -> int:
    """Parameters of the real module, built on the ``meta`` device (no memory is allocated)."""
    import torch

    from m6.model.m6 import M6Model

    with torch.device("meta"):
        model = M6Model(cfg)
    return sum(p.numel() for p in model.parameters())
