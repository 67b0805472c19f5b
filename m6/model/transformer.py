"""Pre-norm transformer with MoE FFNs every n-th layer, a KV cache, and cross-layer sharing with delinking."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from m6.config import ModelConfig
from m6.model.moe import MoE


class KVCache:
    """Keys and values of every layer for incremental decoding; tensors are ``[B, H, L, hd]``."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values for layer ``i``; returns the full keys/values."""
        if self.k[i] is not None:
            k = torch.cat([self.k[i], k], dim=2)
            v = torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the surviving hypotheses)."""
        for i in range(len(self.k)):
            if self.k[i] is not None:
                self.k[i] = self.k[i].index_select(0, index)
                self.v[i] = self.v[i].index_select(0, index)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x_BLD: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, L, D = x_BLD.shape
        H = self.n_heads
        q, k, v = self.qkv(x_BLD).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each (B, H, L, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class DenseFFN(nn.Module):
    """GELU MLP ``D → F → D``."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))`` then ``x + ffn(ln(x))``; the FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, *, moe: bool, ep_group=None):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.is_moe = moe
        self.ffn = MoE(cfg.moe(), ep_group=ep_group) if moe else DenseFFN(cfg.d_model, cfg.d_ff)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, cache=None, layer=0, token_valid=None):
        x = x + self.drop(self.attn(self.ln1(x), mask, cache, layer))
        h = self.ln2(x)
        if self.is_moe:
            y, aux = self.ffn(h, token_valid)
        else:
            y, aux = self.ffn(h), None
        return x + self.drop(y), aux


class Transformer(nn.Module):
    """A stack of ``cfg.n_layers`` blocks, optionally sharing weights across layers.

    With ``cfg.share_layers`` the model is the "pseudo giant" of M6-10T Pseudo-to-Real
    (arXiv 2110.03888, Sec. 3): only one block per position in the dense/MoE period is
    stored (a dense and an MoE block when ``moe_every = 2``) and layer i runs block
    ``i % period``. :meth:`delink` turns it into the "real" model with independent
    per-layer weights initialised from the shared ones.
    """

    def __init__(self, cfg: ModelConfig, ep_group=None):
        super().__init__()
        self.cfg = cfg
        self.ep_group = ep_group
        period = cfg.moe_every if cfg.moe_every > 0 else 1
        n_unique = min(period, cfg.n_layers) if cfg.share_layers else cfg.n_layers
        self.blocks = nn.ModuleList(Block(cfg, moe=cfg.is_moe_layer(i), ep_group=ep_group) for i in range(n_unique))
        self.layer_block = [i % n_unique for i in range(cfg.n_layers)]
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self._stats: dict[int, dict] = {}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None,
                token_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-normed hidden states and the summed MoE aux losses.

        ``token_valid`` ([B, L] bool) keeps padding out of the MoE routing.
        """
        aux_total = x.new_zeros((), dtype=torch.float32)
        for i, b in enumerate(self.layer_block):
            x, aux = self.blocks[b](x, mask, cache, i, token_valid)
            if aux is not None:
                aux_total = aux_total + aux
                self._accumulate(i, self.blocks[b].ffn.last_stats)
        return self.ln_f(x), aux_total

    def reset_stats(self) -> None:
        """Forget the MoE statistics gathered so far (called at the start of each model forward)."""
        self._stats = {}

    def _accumulate(self, layer: int, st: dict) -> None:
        # Several passes per forward (the contrastive objective encodes images and texts
        # separately) add up, so the statistics describe everything the layer routed.
        old = self._stats.get(layer)
        if old is None:
            self._stats[layer] = {"layer": layer, **st}
            return
        tokens = old["tokens"] + st["tokens"]
        counts = [a + b for a, b in zip(old["tokens_per_expert"], st["tokens_per_expert"])]
        c = torch.tensor(counts, dtype=torch.float64)
        assignments = old["assignments"] + st["assignments"]
        dropped = old["dropped"] + st["dropped"]
        self._stats[layer] = {
            "layer": layer, "tokens": tokens, "assignments": assignments, "tokens_per_expert": counts,
            "dropped": dropped, "drop_rate": dropped / max(1, assignments),
            "load_cv": float(c.std(unbiased=False) / c.mean()) if c.sum() > 0 else 0.0,
            "router_entropy": (old["router_entropy"] * old["tokens"] + st["router_entropy"] * st["tokens"]) / max(1, tokens),
            "capacity": st["capacity"], "aux_loss": old["aux_loss"] + st["aux_loss"],
        }

    def moe_stats(self) -> list[dict]:
        """Statistics of every MoE layer (depth order) since the last :meth:`reset_stats`."""
        return [self._stats[i] for i in sorted(self._stats)]

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(layer index, MoE module) for each MoE layer in depth order (shared modules repeat)."""
        return [(i, self.blocks[b].ffn) for i, b in enumerate(self.layer_block) if self.blocks[b].is_moe]

    @property
    def shared(self) -> bool:
        return len(self.blocks) < self.cfg.n_layers

    def delink(self, prefix: str = "") -> dict[str, list[str]]:
        """Give every layer its own copy of the shared block it ran (outputs are unchanged).

        Returns:
            shared parameter name → the per-layer parameter names that now hold a copy
            of it, so a trainer can copy optimizer state (Adam moments) across. Empty
            when the stack was not shared.
        """
        if not self.shared:
            return {}
        old_names = {id(p): n for n, p in self.blocks.named_parameters()}
        mapping: dict[str, list[str]] = {f"{prefix}blocks.{n}": [] for n in old_names.values()}
        new_blocks = []
        for i, b in enumerate(self.layer_block):
            src = self.blocks[b]
            group = src.ffn.ep_group if src.is_moe else None
            if src.is_moe:
                src.ffn.ep_group = None  # a process group cannot be deep-copied; re-attach it after
            blk = copy.deepcopy(src)
            if src.is_moe:
                src.ffn.ep_group = blk.ffn.ep_group = group
            for (n_src, p_src), (n_new, p_new) in zip(src.named_parameters(), blk.named_parameters()):
                mapping[f"{prefix}blocks.{b}.{n_src}"].append(f"{prefix}blocks.{i}.{n_new}")
                for attr in ("allreduce", "group_name"):  # the expert-parameter marks must survive the copy
                    if hasattr(p_src, attr):
                        setattr(p_new, attr, getattr(p_src, attr))
            new_blocks.append(blk)
        self.blocks = nn.ModuleList(new_blocks)
        self.layer_block = list(range(self.cfg.n_layers))
        return mapping
