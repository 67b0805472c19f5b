"""Granular CPU offloading (M6-10T, arXiv 2110.03888 §3.3): chosen layers keep optimizer state on the CPU."""

from __future__ import annotations

from collections.abc import Callable

import torch


class GranularOffloadAdamW(torch.optim.Optimizer):
    """AdamW whose fp32 master weights and moments live on the CPU for chosen layers.

    ZeRO-Offload moves all optimizer state to the host; M6-10T offloads only as many layers
    as needed so the rest keep updating on the device. For an offloaded parameter each step
    copies the gradient to the host, updates the host fp32 master and moments there, and
    copies the new weights back; other parameters update in place on their device.

    Args:
        params: parameter groups (``lr``, ``weight_decay`` per group).
        offload_layers: layer indices whose state goes to the CPU.
        layer_of: maps a parameter to its layer index (None for embeddings, heads).
    """

    def __init__(self, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, offload_layers: set[int], layer_of: Callable[[torch.nn.Parameter], int | None]):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.offload_layers = set(offload_layers)
        self._offloaded = {id(p) for g in self.param_groups for p in g["params"]
                           if layer_of(p) is not None and layer_of(p) in self.offload_layers}
        self._layer = {id(p): layer_of(p) for g in self.param_groups for p in g["params"]}

    def is_offloaded(self, p: torch.nn.Parameter) -> bool:
        return id(p) in self._offloaded

    def placement(self) -> dict[int, str]:
        """Layer index → where its optimizer state and master weights live (``cpu`` or the device type)."""
        out: dict[int, str] = {}
        for g in self.param_groups:
            for p in g["params"]:
                layer = self._layer[id(p)]
                if layer is not None:
                    out[layer] = "cpu" if id(p) in self._offloaded else p.device.type
        return dict(sorted(out.items()))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                off = id(p) in self._offloaded
                if not st:
                    home = torch.device("cpu") if off else p.device
                    st["step"] = torch.zeros((), dtype=torch.float64)
                    st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=home)
                    st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=home)
                    if off:  # the fp32 master copy lives with the moments
                        st["master"] = p.detach().to("cpu", torch.float32, copy=True)
                w = st["master"] if off else p
                grad = p.grad.to(w.device, torch.float32)
                st["step"] += 1
                t = float(st["step"])
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(g["eps"])
                w.mul_(1 - g["lr"] * g["weight_decay"])
                w.addcdiv_(m, denom, value=-g["lr"] / (1 - b1**t))
                if off:
                    p.copy_(w.to(p.device, p.dtype, non_blocking=True))
        return loss
