"""Mixture-of-Experts FFN: fp32 top-k / k top-1 router, grouped experts, sort-based dropless dispatch, expert parallelism.

Shape legend for tensor names (after torchtitan's ``moe.py``):

    T  tokens in this call (all leading dims of the input flattened)
    D  d_model
    F  expert hidden width (d_ff)
    E  experts held by the layer (all of them, or this rank's slice under expert parallelism)
    G  prototype groups (M6-T "k top-1": top-1 inside each group)
    K  expert assignments per token (top_k × num_prototypes)
    N  routed (token, expert) assignments kept after capacity
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from m6.config import MoEConfig
from m6.model.dispatch import all_to_all, expert_mlp

__all__ = ["MoE", "MoEConfig", "TopKRouter", "GroupedExperts", "Routing"]


@dataclass
class Routing:
    """The router's decision for T tokens."""

    expert_TK: torch.Tensor
    """Global expert id of each of a token's K assignments (int64)."""
    weight_TK: torch.Tensor
    """Gate weight of each assignment (fp32, differentiable)."""
    aux_loss: torch.Tensor
    """Load-balancing + z-loss, already scaled by their coefficients (fp32 scalar)."""
    stats: dict = field(default_factory=dict)


class TopKRouter(nn.Module):
    """Softmax router in fp32 with top-k or k top-1 (prototype) selection.

    With ``num_prototypes = G > 1`` the E experts split into G contiguous groups;
    each group has its own softmax and picks its top-1 expert, and the token's
    output is the gate-weighted sum over groups ("expert prototyping", M6-T,
    arXiv 2105.15082, Sec. 3). With G = 1 this is plain top-k routing.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight_ED = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model))
        nn.init.normal_(self.weight_ED, std=cfg.d_model ** -0.5 * 0.1)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        """Route ``x_TD``; returns the assignments, gate weights and scaled aux losses."""
        cfg = self.cfg
        G, Eg = cfg.num_prototypes, cfg.num_experts // cfg.num_prototypes
        T = x_TD.shape[0]
        # Routing in fp32 (or wider) even under bf16 autocast: small logit differences decide the
        # expert (Switch Transformer, arXiv 2101.03961, Sec. 2.4).
        dt = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TGe = (x_TD.to(dt) @ self.weight_ED.to(dt).t()).view(T, G, Eg)
            probs_TGe = logits_TGe.softmax(dim=-1)
            k = cfg.top_k
            weight_TGk, local_TGk = probs_TGe.topk(k, dim=-1)
            expert_TGk = local_TGk + (torch.arange(G, device=x_TD.device) * Eg).view(1, G, 1)
            expert_TK = expert_TGk.reshape(T, G * k)
            weight_TK = weight_TGk.reshape(T, G * k)

            aux = x_TD.new_zeros((), dtype=dt)
            if cfg.aux_loss_coef > 0 and T > 0:
                aux = aux + cfg.aux_loss_coef * load_balancing_loss(probs_TGe, local_TGk)
            if cfg.z_loss_coef > 0 and T > 0:
                # ST-MoE router z-loss (arXiv 2202.08906, eq. 5), per prototype group.
                aux = aux + cfg.z_loss_coef * logits_TGe.logsumexp(dim=-1).pow(2).mean()
            with torch.no_grad():
                ent = -(probs_TGe * probs_TGe.clamp_min(1e-20).log()).sum(-1).mean() if T > 0 else aux.new_zeros(())
        return Routing(expert_TK=expert_TK, weight_TK=weight_TK, aux_loss=aux, stats={"router_entropy": float(ent)})


def load_balancing_loss(probs_TGe: torch.Tensor, local_TGk: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``N·Σᵢ fᵢ·Pᵢ`` (arXiv 2101.03961, eq. 4), unscaled.

    ``fᵢ`` is the fraction of assignments sent to expert i (before any capacity
    drop), ``Pᵢ`` the mean router probability of expert i, N the experts per
    group. For top-k, ``fᵢ`` counts all k choices, so ``Σᵢ fᵢ = 1`` and a uniform
    router gives exactly 1. With prototype groups the loss is averaged over groups.
    """
    T, G, Eg = probs_TGe.shape
    k = local_TGk.shape[-1]
    one_hot = torch.zeros(T, G, Eg, device=probs_TGe.device, dtype=probs_TGe.dtype)
    one_hot.scatter_add_(2, local_TGk, torch.ones_like(local_TGk, dtype=probs_TGe.dtype))
    f_Ge = one_hot.sum(0) / (T * k)
    P_Ge = probs_TGe.mean(0)
    return (Eg * (f_Ge * P_Ge).sum(-1)).mean()


class GroupedExperts(nn.Module):
    """E GELU MLPs ``D → F → D`` stored as stacked weights ``w1_EDF``, ``w2_EFD`` (no biases)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, ep_size: int = 1):
        super().__init__()
        self.method = "auto"
        """Expert kernel: "auto" (grouped matmul on CUDA, loop elsewhere), "grouped" or "loop"."""
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        nn.init.normal_(self.w1_EDF, std=d_model ** -0.5)
        nn.init.normal_(self.w2_EFD, std=d_ff ** -0.5)
        for p in (self.w1_EDF, self.w2_EFD):
            # DeepSpeed's convention for expert parameters: ZeRO keeps them out of the
            # data-parallel all-reduce and reduces them within the expert-data-parallel group.
            p.allreduce = False
            p.group_name = f"ep_size_{ep_size}"

    def forward(self, x_ND: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """Apply expert e to the ``counts_E[e]`` consecutive rows that belong to it."""
        return expert_mlp(x_ND, self.w1_EDF, self.w2_EFD, counts_E, method=self.method)


class MoE(nn.Module):
    """An MoE FFN layer: ``y, aux = layer(x)`` with ``x: [..., D]``; ``layer.last_stats`` after each call.

    Args:
        cfg: the layer's shape and routing.
        ep_group: a ``torch.distributed`` process group for expert parallelism; the
            layer then holds only its rank's ``E / world`` experts and exchanges
            tokens with all-to-all. None = all experts local.
    """

    def __init__(self, cfg: MoEConfig, ep_group=None):
        super().__init__()
        self.cfg = cfg
        self.ep_group = ep_group
        if ep_group is not None:
            import torch.distributed as dist

            self.ep_size, self.ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        else:
            self.ep_size, self.ep_rank = 1, 0
        if cfg.num_experts % self.ep_size:
            raise ValueError(f"moe.num_experts ({cfg.num_experts}) must divide by the expert-parallel size ({self.ep_size})")
        self.local_experts = cfg.num_experts // self.ep_size
        self.router = TopKRouter(cfg)
        self.experts = GroupedExperts(self.local_experts, cfg.d_model, cfg.d_ff, ep_size=self.ep_size)
        self.last_stats: dict = {}

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity in assignments for ``num_tokens`` local tokens (None = dropless)."""
        cf = self.cfg.capacity_factor
        if cf is None:
            return None
        return max(1, math.ceil(cf * num_tokens * self.cfg.experts_per_token / self.cfg.num_experts))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Route, dispatch, apply experts, combine. Returns ``(y, aux_loss)``; y has x's shape.

        ``token_mask`` (bool, x's leading shape) excludes positions such as padding: they
        are not routed, do not count in the balancing loss or capacity, and get y = 0.
        """
        shape = x.shape
        if token_mask is not None:
            keep_idx = token_mask.reshape(-1).nonzero().squeeze(1)
            y_kept, aux = self._forward_tokens(x.reshape(-1, shape[-1]).index_select(0, keep_idx))
            y = x.new_zeros(token_mask.numel(), shape[-1])
            return y.index_copy(0, keep_idx, y_kept).view(shape), aux
        y, aux = self._forward_tokens(x.reshape(-1, shape[-1]))
        return y.view(shape), aux

    def _forward_tokens(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on a flat ``[T, D]`` block of tokens."""
        T = x_TD.shape[0]
        E = self.cfg.num_experts
        dev = x_TD.device
        r = self.router(x_TD)
        K = r.expert_TK.shape[1]

        # Flatten assignments choice-major (all first choices, then second, ...) so that under a
        # capacity limit a token's first choice wins over other tokens' second choices (GShard, Alg. 1).
        expert_A = r.expert_TK.t().reshape(-1)
        token_A = torch.arange(T, device=dev).repeat(K)
        weight_A = r.weight_TK.t().reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)
        counts_E = torch.bincount(expert_A, minlength=E)
        cap = self.capacity(T)
        dropped = 0
        if cap is not None:
            # Drop overflow at the index level: position of each sorted assignment inside its
            # expert's run; those at or beyond capacity are removed before any gather.
            start_E = counts_E.cumsum(0) - counts_E
            sorted_expert = expert_A[order_A]
            pos = torch.arange(order_A.numel(), device=dev) - start_E[sorted_expert]
            keep = pos < cap
            dropped = int((~keep).sum())
            order_A = order_A[keep]
            kept_E = counts_E.clamp(max=cap)
        else:
            kept_E = counts_E
        token_N = token_A[order_A]
        x_ND = x_TD.index_select(0, token_N)

        if self.ep_size == 1:
            y_ND = self.experts(x_ND, kept_E.tolist())
        else:
            y_ND = self._expert_parallel(x_ND, kept_E)

        y_ND = y_ND * weight_A[order_A].unsqueeze(1).to(y_ND.dtype)
        if K == 1 and dropped == 0:
            # every token has exactly one row: a permutation back, no zero-fill and no accumulation
            y_TD = torch.empty_like(x_TD).index_copy_(0, token_N, y_ND.to(x_TD.dtype))
        else:
            y_TD = torch.zeros_like(x_TD).index_add_(0, token_N, y_ND.to(x_TD.dtype))

        with torch.no_grad():
            c = counts_E.float()
            cv = float(c.std(unbiased=False) / c.mean()) if T > 0 else 0.0
        self.last_stats = {
            "tokens": T,
            "assignments": T * K,
            "tokens_per_expert": counts_E.tolist(),
            "dropped": dropped,
            "drop_rate": dropped / max(1, T * K),
            "load_cv": cv,
            "router_entropy": r.stats["router_entropy"],
            "capacity": cap,
            "aux_loss": float(r.aux_loss.detach()),
        }
        return y_TD, r.aux_loss

    def _expert_parallel(self, x_ND: torch.Tensor, kept_E: torch.Tensor) -> torch.Tensor:
        """Send rows to the ranks holding their experts, apply the local experts, send results back.

        Rows arrive sorted by global expert, hence grouped by destination rank. After the
        exchange this rank holds, for each source rank, rows sorted by local expert; a
        stable re-sort groups them by local expert for the grouped matmul.
        """
        W, El = self.ep_size, self.local_experts
        counts_WEl = kept_E.view(W, El)
        send_W = counts_WEl.sum(1)
        # Each rank learns how many rows per local expert every other rank sends it.
        recv_counts_WEl = all_to_all(counts_WEl.reshape(-1).contiguous(), [El] * W, [El] * W, self.ep_group,
                                     differentiable=False).view(W, El)
        recv_W = recv_counts_WEl.sum(1)
        x_recv = all_to_all(x_ND, recv_W.tolist(), send_W.tolist(), self.ep_group)
        local_expert = torch.repeat_interleave(torch.arange(El, device=x_ND.device).repeat(W), recv_counts_WEl.reshape(-1))
        order = torch.argsort(local_expert, stable=True)
        y_sorted = self.experts(x_recv.index_select(0, order), recv_counts_WEl.sum(0).tolist())
        y_recv = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        return all_to_all(y_recv, send_W.tolist(), recv_W.tolist(), self.ep_group)
