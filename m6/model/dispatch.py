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

    One autograd node for the whole expert MLP: the backward is written out as four
    grouped matmuls and keeps only ``x`` and the pre-activation for it (GELU is
    recomputed), one ``N×F`` activation less than autograd through separate ops.

    Args:
        x_ND: rows sorted by expert.
        w1_EDF, w2_EFD: stacked expert weights.
        counts_E: rows per expert (python ints; sum == N).
        method: "grouped" (``torch._grouped_mm``), "loop" (one matmul per expert over
            ``unbind``-ed weights, writing into slices of one output) or "auto"
            (grouped on CUDA where supported, loop elsewhere).
    """
    if method not in ("auto", "grouped", "loop"):
        raise ValueError(f"method must be auto|grouped|loop, got {method!r}")
    dev = x_ND.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x_ND, w1_EDF, w2_EFD = x_ND.to(dt), w1_EDF.to(dt), w2_EFD.to(dt)
    elif x_ND.dtype != w1_EDF.dtype:
        x_ND = x_ND.to(w1_EDF.dtype)
    if method == "grouped" and not grouped_mm_supported(x_ND, w1_EDF):
        raise ValueError(f"torch._grouped_mm cannot run on {x_ND.dtype} {tuple(w1_EDF.shape)} on {dev}")
    # On the CPU torch._grouped_mm loops over groups internally and measured ~1.15x slower than
    # our own loop of mm(out=...) slices (benchmarks/moe_bench.py), so "auto" uses it on CUDA only.
    grouped = method == "grouped" or (method == "auto" and x_ND.device.type == "cuda"
                                      and grouped_mm_supported(x_ND, w1_EDF))
    return _ExpertMLP.apply(x_ND, w1_EDF, w2_EFD, [int(c) for c in counts_E], grouped)


def _rows_mm(a_NK: torch.Tensor, w_EKM: torch.Tensor, counts: list[int], offs, grouped: bool) -> torch.Tensor:
    """``out[rows of e] = a[rows of e] @ w[e]``."""
    if grouped and a_NK.shape[0] > 0:
        return torch._grouped_mm(a_NK, w_EKM, offs=offs)
    out = a_NK.new_empty(a_NK.shape[0], w_EKM.shape[-1])
    for a, w, o, n in zip(a_NK.split(counts), w_EKM.unbind(0), out.split(counts), counts):
        if n:
            torch.mm(a, w, out=o)
    return out


def _weights_mm(a_NK: torch.Tensor, b_NM: torch.Tensor, counts: list[int], offs, grouped: bool) -> torch.Tensor:
    """``out[e] = a[rows of e]ᵀ @ b[rows of e]`` (weight gradients); zero for experts without rows."""
    E = len(counts)
    if grouped and a_NK.shape[0] > 0:
        return torch._grouped_mm(a_NK.t(), b_NM, offs=offs)
    # new_empty, not new_zeros: zero-filling E×K×M before overwriting it cost ~3% of the layer.
    out = a_NK.new_empty(E, a_NK.shape[1], b_NM.shape[1])
    for a, b, o, n in zip(a_NK.split(counts), b_NM.split(counts), out.unbind(0), counts):
        if n:
            torch.mm(a.t(), b, out=o)
        else:
            o.zero_()
    return out


class _ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w1_EDF, w2_EFD, counts, grouped):
        offs = torch.tensor(counts, dtype=torch.int64, device=x_ND.device).cumsum(0).to(torch.int32)
        pre_NF = _rows_mm(x_ND, w1_EDF, counts, offs, grouped)
        y_ND = _rows_mm(F.gelu(pre_NF), w2_EFD, counts, offs, grouped)
        ctx.save_for_backward(x_ND, pre_NF, w1_EDF, w2_EFD, offs)
        ctx.counts, ctx.grouped = counts, grouped
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, pre_NF, w1_EDF, w2_EFD, offs = ctx.saved_tensors
        counts, grouped = ctx.counts, ctx.grouped
        dy_ND = dy_ND.contiguous()
        h_NF = F.gelu(pre_NF)  # recomputed instead of stored
        dw2 = _weights_mm(h_NF, dy_ND, counts, offs, grouped)
        dh_NF = _rows_mm(dy_ND, w2_EFD.transpose(1, 2), counts, offs, grouped)
        del h_NF
        dpre_NF = torch.ops.aten.gelu_backward(dh_NF, pre_NF)
        del dh_NF
        dw1 = _weights_mm(x_ND, dpre_NF, counts, offs, grouped)
        dx = _rows_mm(dpre_NF, w1_EDF.transpose(1, 2), counts, offs, grouped) if ctx.needs_input_grad[0] else None
        return dx, dw1, dw2, None, None


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
