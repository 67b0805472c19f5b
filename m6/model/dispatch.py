"""Expert compute kernels (grouped matmul or per-expert loop) and a differentiable all-to-all."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GROUPED_MM = hasattr(torch, "_grouped_mm")


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run on these operands.

    It needs 16-byte aligned rows (d_model and d_ff multiples of 16 bytes); on the
    CPU it takes fp32 and bf16, on CUDA bf16 on compute capability 9.0+ (Hopper).
    """
    if not _GROUPED_MM or x.dtype != w.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    size = x.element_size()
    if (x.shape[-1] * size) % 16 or (w.shape[-1] * size) % 16:
        return False
    if x.device.type == "cpu":
        return True
    if x.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x.device)
        return major >= 9 and x.dtype == torch.bfloat16
    return False


def expert_mlp(x_ND: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor, counts_E: list[int],
               *, method: str = "auto") -> torch.Tensor:
    """``gelu(x @ w1[e]) @ w2[e]`` for each expert e over its ``counts_E[e]`` consecutive rows of ``x_ND``.

    Args:
        x_ND: rows sorted by expert.
        w1_EDF, w2_EFD: stacked expert weights.
        counts_E: rows per expert (python ints; sum == N).
        method: "grouped" (``torch._grouped_mm``), "loop" (one matmul per expert over
            ``unbind``-ed weights) or "auto" (grouped where supported).
    """
    if x_ND.dtype != w1_EDF.dtype:
        x_ND = x_ND.to(w1_EDF.dtype)
    use_grouped = method == "grouped" or (method == "auto" and grouped_mm_supported(x_ND, w1_EDF))
    if use_grouped and x_ND.shape[0] > 0:
        offs = torch.tensor(counts_E, device=x_ND.device, dtype=torch.int64).cumsum(0).to(torch.int32)
        h_NF = F.gelu(torch._grouped_mm(x_ND, w1_EDF, offs=offs))
        return torch._grouped_mm(h_NF, w2_EFD, offs=offs)
    return _loop_mlp(x_ND, w1_EDF, w2_EFD, counts_E)


def _loop_mlp(x_ND, w1_EDF, w2_EFD, counts_E):
    outs = []
    for x_nD, w1, w2, n in zip(x_ND.split(counts_E), w1_EDF.unbind(0), w2_EFD.unbind(0), counts_E):
        if n:
            outs.append(F.gelu(x_nD @ w1) @ w2)
    if not outs:
        # No rows: keep the weights in the graph so every rank's backward touches the same parameters.
        return x_ND.new_zeros(0, w2_EFD.shape[-1]) + 0.0 * (w1_EDF.sum() + w2_EFD.sum())
    return torch.cat(outs, 0)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        import torch.distributed as dist

        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        g = grad.contiguous()
        out = g.new_empty((sum(ctx.in_splits), *g.shape[1:]))
        dist.all_to_all_single(out, g, ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, *,
               differentiable: bool = True) -> torch.Tensor:
    """Exchange rows of ``x``: ``in_splits[r]`` rows go to rank r, ``out_splits[r]`` rows come from it.

    Differentiable: the backward sends gradients along the reverse routes.
    """
    if differentiable:
        return _AllToAll.apply(x, [int(s) for s in out_splits], [int(s) for s in in_splits], group)
    import torch.distributed as dist

    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), [int(s) for s in out_splits], [int(s) for s in in_splits], group=group)
    return out
