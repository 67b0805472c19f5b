"""The DeepSpeed engine around M6Model: process groups, expert-parameter groups, optimizer, schedule."""

from __future__ import annotations

import logging
import math
import types
from typing import Any

import torch
from torch import nn

from m6.config import Config
from m6.train.dsconfig import OffloadPlan, deepspeed_config, lr_at, parse_offload

log = logging.getLogger(__name__)


SCALAR_PARAMS: set[str] = set()
"""Names of 0-dim parameters trained as shape [1] under ZeRO-3 (see build_engine)."""


class TrainModule(nn.Module):
    """What the DeepSpeed engine wraps: the model, plus one DeepSpeed MoE marker per MoE layer.

    DeepSpeed only switches on its expert-parallel gradient reduction (expert grads reduced
    over the expert-data-parallel group, not the whole world) when it finds instances of its
    own ``deepspeed.moe.layer.MoE``. Our MoE layers mark their parameters DeepSpeed's way
    (``allreduce=False``, ``group_name``); the markers, which hold no parameters and never
    run, tell the engine that such parameters exist.
    """

    def __init__(self, model: nn.Module, markers: list[nn.Module]):
        super().__init__()
        self.model = model
        self.ds_moe_markers = nn.ModuleList(markers)

    def forward(self, batch: dict[str, torch.Tensor], objective: str) -> dict:
        return self.model(batch, objective)


def moe_markers(model: nn.Module, ep_size: int) -> list[nn.Module]:
    """One parameterless ``deepspeed.moe.layer.MoE`` instance per MoE layer of ``model``."""
    from deepspeed.moe.layer import MoE as DSMoE

    from m6.model.moe import MoE

    class ExpertLayerMarker(DSMoE):
        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            # The groups exist already (expert_groups); the real layer holds its EP group itself.
            expert_groups(self.ep_size)

    out = []
    for mod in model.modules():
        if isinstance(mod, MoE):
            marker = ExpertLayerMarker.__new__(ExpertLayerMarker)
            nn.Module.__init__(marker)  # deliberately not DSMoE.__init__: no gate, no experts, never called
            marker.num_experts = mod.cfg.num_experts
            marker.ep_size = ep_size
            marker.expert_group_name = f"ep_size_{ep_size}"
            marker.num_local_experts = mod.cfg.num_experts // ep_size
            out.append(marker)
    return out


def init_distributed(on_gpu: bool) -> None:
    """Join the job's process group (env:// rendezvous): gloo on the CPU, NCCL on GPUs."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)


def expert_groups(ep_size: int) -> Any:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups; return our rank's EP group."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def param_groups(model: nn.Module, weight_decay: float, offload: OffloadPlan) -> list[dict]:
    """AdamW groups: no decay on biases, norms, embeddings and the temperature; expert params split out."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "pos" in name or "seg" in name or name.endswith("tok.weight") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def layer_of(name: str) -> int | None:
    """The transformer layer (block) index a parameter name belongs to, if any."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "blocks" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block in the backward pass instead of keeping its activations.

    Non-reentrant ``torch.utils.checkpoint`` restores the RNG state for the recompute, and every
    rank recomputes its blocks in the same order, so the MoE all-to-alls inside a block match up
    across the expert-parallel group again. Returns the number of blocks wrapped.
    """
    from torch.utils.checkpoint import checkpoint

    from m6.model.transformer import Block

    n = 0
    for blk in model.modules():
        if isinstance(blk, Block):
            # Always wrap the class's forward bound to this block: a block deep-copied by delinking
            # carries its source's wrapper, which must not keep running the source's weights.
            inner = types.MethodType(type(blk).forward, blk)

            def forward(x, mask, cache=None, layer=0, token_valid=None, _inner=inner):
                if cache is not None or not torch.is_grad_enabled():  # generation keeps its KV cache path
                    return _inner(x, mask, cache, layer, token_valid)
                return checkpoint(_inner, x, mask, None, layer, token_valid, use_reentrant=False)

            blk.forward = forward
            n += 1
    return n


def build_engine(model: nn.Module, cfg: Config, *, world_size: int, on_gpu: bool, ep_size: int) -> tuple[Any, Any, Any]:
    """``(engine, optimizer, scheduler)`` for ``model`` as the config asks.

    ZeRO 0–2 carry DeepSpeed MoE markers (expert-parallel reduction); ZeRO-3 runs without them,
    as DeepSpeed's native MoE support stops at stage 2, so ZeRO-3 requires ``ep_size == 1``.
    """
    import deepspeed

    t = cfg.train
    offload = parse_offload(t.offload, cfg.model.n_layers)
    ds_cfg = deepspeed_config(t, world_size=world_size, on_gpu=on_gpu, n_layers=cfg.model.n_layers)
    if t.zero_stage == 3 and ep_size > 1:
        from m6.config import ConfigError

        raise ConfigError("train.ep_size: ZeRO-3 runs experts data-parallel (DeepSpeed MoE stops at stage 2); use ep_size 1")
    if t.zero_stage == 3:
        # ZeRO-3 partitions every parameter by viewing it as bytes, impossible for a 0-dim tensor;
        # such scalars (the contrastive temperature) train as shape [1] and are saved as scalars.
        for name, p in list(model.named_parameters()):
            if p.dim() == 0:
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                owner.register_parameter(leaf, nn.Parameter(p.detach().reshape(1).clone()))
                SCALAR_PARAMS.add(name)
    checkpointed = enable_activation_checkpointing(model) if t.activation_checkpointing else 0
    markers = moe_markers(model, ep_size) if t.zero_stage < 3 else []
    module = TrainModule(model, markers)
    groups = param_groups(model, t.weight_decay, offload)
    betas = (0.9, 0.95)
    if offload.mode == "optimizer":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=t.lr, betas=betas, weight_decay=t.weight_decay, adamw_mode=True)
    elif offload.mode == "granular":
        from m6.train.offload import GranularOffloadAdamW

        names = {id(p): n for n, p in model.named_parameters()}
        optimizer = GranularOffloadAdamW(groups, lr=t.lr, betas=betas,
                                         offload_layers=set(offload.layers), layer_of=lambda p: layer_of(names[id(p)]))
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=betas, weight_decay=t.weight_decay, foreach=False)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, t))

    if t.zero_stage == 3:
        # The router returns a Routing record ZeRO-3 cannot look inside, so it would not re-gather
        # router weights for backward; a ZeRO-3 "leaf" MoE layer is gathered whole instead.
        from deepspeed.utils import set_z3_leaf_modules

        from m6.model.moe import MoE

        set_z3_leaf_modules(model, [MoE])
    # DeepSpeed's initial broadcast views each parameter as bytes, which fails for 0-dim tensors
    # (the contrastive temperature). Every rank builds the model from the same seed, so those
    # are equal already; DeepSpeed's own "do not broadcast" mark skips them during set-up only.
    scalars = [p for p in model.parameters() if p.dim() == 0]
    for p in scalars:
        p.ds_optim_param = True
    try:
        engine, opt, _, sched = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_cfg,
                                                     lr_scheduler=schedule, dist_init_required=False)
    finally:
        for p in scalars:
            del p.ds_optim_param
    engine.m6_checkpointed_blocks = checkpointed
    return engine, opt, sched


def peak_flops(on_gpu: bool) -> tuple[float, str]:
    """Peak FLOP/s of this process's device for MFU, and where the figure came from.

    GPUs: the vendor's dense bf16 figure by model name. CPU: a short fp32 GEMM measured here
    (there is no published per-core figure to trust), so CPU MFU is relative to achievable GEMM speed.
    """
    if on_gpu:
        name = torch.cuda.get_device_name().lower()
        for key, val in (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("v100", 125e12), ("l4", 121e12),
                         ("a10", 125e12), ("l40", 362e12)):
            if key in name:
                return val, f"vendor bf16 peak for {name}"
        return 312e12, f"assumed A100-class peak for {name}"
    import time

    n = 512
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG (span corruption) untouched
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0), "measured fp32 GEMM (512³) on this process's threads"


def clip_gradients(model: nn.Module, max_norm: float, ep_group: Any) -> float:
    """Clip by the global gradient norm (call after backward, before ``engine.step()``); returns the norm.

    Replicated gradients are identical on every rank after DeepSpeed's all-reduce; expert
    gradients differ across the expert-parallel group, so their squared norms are summed over it.
    """
    import torch.distributed as dist

    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "allreduce", True) is False:
            expert_sq += sq
        else:
            dense_sq += sq
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dev = grads[0].device if grads else torch.device("cpu")
        t = expert_sq.to(dev)
        dist.all_reduce(t, group=ep_group)
        expert_sq = t.cpu()
    norm = float((dense_sq + expert_sq).sqrt())
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(coef)
    return norm


def grad_norm(engine: Any) -> float:
    """The global gradient norm DeepSpeed computed for clipping at the last step (NaN if unavailable)."""
    g = engine.get_global_grad_norm()
    if g is None:
        return math.nan
    return float(g.item() if torch.is_tensor(g) else g)
