"""Capacity planner: per-GPU memory under each ZeRO/offload/EP choice, the cheapest fit, time and energy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from m6.config import ModelConfig

# Peak dense tensor throughput (FLOP/s, bf16/fp16) and board power (W) of common accelerators.
GPU_SPECS = {
    "v100": {"peak_flops": 125e12, "power_w": 300.0},
    "a100": {"peak_flops": 312e12, "power_w": 400.0},
    "h100": {"peak_flops": 989e12, "power_w": 700.0},
    "h200": {"peak_flops": 989e12, "power_w": 700.0},
}
# Link bandwidths in bytes/s (one direction, per GPU).
INTERCONNECTS = {"ethernet-25g": 3.1e9, "ethernet-100g": 12.5e9, "ib-hdr": 25e9, "ib-ndr": 50e9, "nvlink": 300e9}
PCIE_BYTES_PER_S = 12e9
"""Host↔device copy bandwidth per GPU (PCIe 3/4 x16, achieved)."""
USABLE_FRACTION = 0.9
"""Share of device/host memory the plan may fill; the rest is allocator fragmentation and buffers."""


@dataclass(kw_only=True)
class Cluster:
    """The hardware a run would get.

    Attributes:
        gpus: total accelerators. gpu_mem_bytes: memory per accelerator.
        gpus_per_node: accelerators per node. cpu_mem_per_node_bytes: host memory per node.
        gpu: a key of GPU_SPECS. interconnect: a key of INTERCONNECTS (between nodes).
    """

    gpus: int
    gpu_mem_bytes: float
    gpus_per_node: int = 8
    cpu_mem_per_node_bytes: float = 512 * 2**30
    gpu: str = "a100"
    interconnect: str = "ib-hdr"
    pue: float = 1.1

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ValueError("cluster: gpus and gpus_per_node must be >= 1")
        if self.gpu not in GPU_SPECS:
            raise ValueError(f"cluster.gpu: unknown {self.gpu!r}; choose one of {', '.join(GPU_SPECS)}")
        if self.interconnect not in INTERCONNECTS:
            raise ValueError(f"cluster.interconnect: unknown {self.interconnect!r}; choose one of {', '.join(INTERCONNECTS)}")

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)


@dataclass
class ParamBreakdown:
    """Parameter counts of one model, split by how they shard."""

    dense: int
    """Attention, dense FFNs, norms, embeddings, heads: replicated across data-parallel ranks."""
    expert: int
    """All experts of all MoE layers: divided over the expert-parallel group."""
    active: int
    """Parameters one token passes through (dense + experts_per_token of each MoE layer)."""
    layer_max: int
    """The largest single layer (dense part + all its experts): the working set of granular offload."""
    moe_layers: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def param_breakdown(m: ModelConfig) -> ParamBreakdown:
    """Split the model's parameter count (``m6.model.params.count_params``) by how it shards,
    plus the largest single layer (attention 4d², FFN 2·d·d_ff, experts) for granular offload."""
    from m6.model.params import count_params

    counts = count_params(m)
    d = m.d_model
    attn = 4 * d * d + 4 * d + 4 * d  # q,k,v,o with biases, two layer norms
    dense_ffn = 2 * d * m.d_ff + m.d_ff + d
    one_expert = 2 * d * m.expert_d_ff + m.expert_d_ff + d
    router = d * m.num_experts
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    layer_max = attn + (router + m.num_experts * one_expert if moe_layers else dense_ffn)
    return ParamBreakdown(dense=counts["total"] - counts["expert"], expert=counts["expert"], active=counts["active"],
                          layer_max=layer_max, moe_layers=moe_layers)


@dataclass
class Option:
    """One parallelism/offload choice and its estimated footprint and speed."""

    zero_stage: int
    ep_size: int
    offload: str
    activation_checkpointing: bool
    gpu_bytes: dict[str, float] = field(default_factory=dict)
    cpu_bytes_per_node: float = 0.0
    fits: bool = False
    why_not: str = ""
    step_time_s: float = 0.0
    """Estimated seconds per micro-step: compute, or the traffic when it cannot hide behind compute."""
    comm_s: float = 0.0

    @property
    def gpu_total_bytes(self) -> float:
        return sum(self.gpu_bytes.values())


def _memory(opt: Option, pb: ParamBreakdown, m: ModelConfig, c: Cluster, micro_batch: int, precision: str) -> None:
    """Fill ``opt.gpu_bytes`` and ``opt.cpu_bytes_per_node`` (ZeRO paper accounting, Rajbhandari et al. 2020)."""
    n = c.gpus
    wb = 2 if precision == "bf16" else 4  # weight and gradient bytes
    ob = 12 if precision == "bf16" else 8  # fp32 master + Adam m, v (fp32 training keeps no master copy)
    dense, expert = float(pb.dense), pb.expert / opt.ep_size
    exp_dp = max(1, n // opt.ep_size)  # experts are data-parallel over N/ep replicas
    p_div = (n, exp_dp) if opt.zero_stage >= 3 else (1, 1)
    g_div = (n, exp_dp) if opt.zero_stage >= 2 else (1, 1)
    o_div = (n, exp_dp) if opt.zero_stage >= 1 else (1, 1)
    params = wb * (dense / p_div[0] + expert / p_div[1])
    grads = wb * (dense / g_div[0] + expert / g_div[1])
    optim = ob * (dense / o_div[0] + expert / o_div[1])
    cpu = 0.0
    if opt.offload == "optimizer":
        cpu += optim
        optim = 0.0
    elif opt.offload.startswith("granular:"):
        frac = float(opt.offload.split(":")[1])
        moved = frac * (params + grads + optim)
        cpu += moved
        # The offloaded layers still pass through the device one (prefetched: two) at a time.
        work = 2 * (wb * 2) * (pb.layer_max - (pb.expert / max(1, pb.moe_layers) if pb.moe_layers else 0)
                               + (pb.expert / max(1, pb.moe_layers)) / opt.ep_size)
        params, grads, optim = params * (1 - frac) + work, grads * (1 - frac), optim * (1 - frac)
    tokens = micro_batch * (m.max_text_len + m.num_image_tokens)
    d, L, a = m.d_model, m.n_layers, m.n_heads
    per_layer = tokens * d * (34 + 5 * a * (m.max_text_len + m.num_image_tokens) / d) * (wb / 2)  # Korthikanti et al. 2022
    acts = (2 * tokens * d * L * (wb / 2) + per_layer) if opt.activation_checkpointing else per_layer * L
    opt.gpu_bytes = {"params": params, "grads": grads, "optimizer": optim, "activations": acts}
    opt.cpu_bytes_per_node = cpu * min(c.gpus_per_node, n)


def _step_time(opt: Option, pb: ParamBreakdown, m: ModelConfig, c: Cluster, micro_batch: int,
               mfu: float) -> tuple[float, float]:
    """(compute seconds per micro-step at the given MFU, communication + offload copy seconds per micro-step).

    MFU is the achieved end-to-end utilisation (Narayanan et al. 2021 count it that way), so
    the duration estimate uses compute time; the communication figure ranks options and flags
    plans whose traffic could not hide behind compute.
    """
    spec = GPU_SPECS[c.gpu]
    tokens = micro_batch * (m.max_text_len + m.num_image_tokens)
    flops_per_token = (8 if opt.activation_checkpointing else 6) * pb.active  # recompute adds a forward pass
    compute = tokens * flops_per_token / (spec["peak_flops"] * mfu)
    bw = INTERCONNECTS[c.interconnect] if c.gpus > c.gpus_per_node else INTERCONNECTS["nvlink"]
    wb = 2
    grad_bytes = wb * (pb.dense + pb.expert / opt.ep_size)
    comm = 2 * grad_bytes / bw * (1.5 if opt.zero_stage == 3 else 1.0) if c.gpus > 1 else 0.0  # ring ≈ 2× payload
    if opt.ep_size > 1 and pb.moe_layers:
        # Two all-to-alls (dispatch, combine) forward and backward per MoE layer (GShard).
        comm += 4 * pb.moe_layers * tokens * m.d_model * wb * m.top_k * m.num_prototypes / bw
    if opt.offload == "optimizer":
        comm += 2 * grad_bytes / PCIE_BYTES_PER_S  # gradients down, updated weights up
    elif opt.offload.startswith("granular:"):
        comm += 3 * float(opt.offload.split(":")[1]) * grad_bytes / PCIE_BYTES_PER_S
    return compute, comm


def candidate_options(m: ModelConfig, c: Cluster) -> list[Option]:
    """Every ZeRO stage × EP size (powers of two dividing the GPUs and experts) × offload choice."""
    moe = m.moe_every > 0
    eps = [e for e in (2**i for i in range(0, 20)) if e <= c.gpus and c.gpus % e == 0 and (not moe or m.num_experts % e == 0)]
    if not moe:
        eps = [1]
    stages = (0, 1, 2) if moe else (0, 1, 2, 3)  # DeepSpeed's native MoE runs with ZeRO <= 2
    offloads = ["none", "optimizer", *(f"granular:{f / 20:g}" for f in range(1, 21))]
    out = []
    for z in stages:
        for e in eps:
            for o in offloads:
                if o == "optimizer" and z == 0 or o.startswith("granular") and z != 0:
                    continue
                for ac in (False, True):
                    out.append(Option(zero_stage=z, ep_size=e, offload=o, activation_checkpointing=ac))
    return out


def plan(m: ModelConfig, c: Cluster, *, tokens: float, micro_batch: int = 1, mfu: float = 0.4,
         precision: str = "bf16") -> dict[str, Any]:
    """Choose the fastest configuration that fits, and estimate time and energy for ``tokens``.

    Returns:
        A dict with ``params`` (total/active/dense/expert), ``best`` (the chosen option with
        per-GPU memory in bytes, step time, days, energy in joules and kWh) or ``None``,
        ``fits`` and ``advice`` (what would make it fit when nothing does), and the count of options tried.
    """
    pb = param_breakdown(m)
    limit_gpu = USABLE_FRACTION * c.gpu_mem_bytes
    limit_cpu = USABLE_FRACTION * c.cpu_mem_per_node_bytes
    options = candidate_options(m, c)
    for o in options:
        _memory(o, pb, m, c, micro_batch, precision)
        reasons = []
        if o.gpu_total_bytes > limit_gpu:
            reasons.append(f"GPU {o.gpu_total_bytes / 2**30:.1f} GiB > {limit_gpu / 2**30:.1f} GiB")
        if o.cpu_bytes_per_node > limit_cpu:
            reasons.append(f"host {o.cpu_bytes_per_node / 2**30:.0f} GiB/node > {limit_cpu / 2**30:.0f} GiB")
        o.fits, o.why_not = not reasons, "; ".join(reasons)
        compute_s, o.comm_s = _step_time(o, pb, m, c, micro_batch, mfu)
        o.step_time_s = max(compute_s, o.comm_s)
    fitting = [o for o in options if o.fits]
    tokens_per_step = c.gpus * micro_batch * (m.max_text_len + m.num_image_tokens)
    result: dict[str, Any] = {
        "model": m.name, "params": {"total": pb.total, "active": pb.active, "dense": pb.dense, "expert": pb.expert},
        "cluster": asdict(c), "tokens": tokens, "mfu": mfu, "options_tried": len(options), "fits": bool(fitting),
        "best": None, "advice": "",
    }
    if fitting:
        best = min(fitting, key=lambda o: (o.step_time_s, o.comm_s, o.offload != "none", o.zero_stage, o.ep_size))
        steps = tokens / tokens_per_step
        duration_s = steps * _step_time(best, pb, m, c, micro_batch, mfu)[0]
        power_w = GPU_SPECS[c.gpu]["power_w"] * c.gpus + 300.0 * c.nodes  # boards + host per node
        energy_j = duration_s * power_w * c.pue
        result["best"] = {**asdict(best), "gpu_total_bytes": best.gpu_total_bytes, "steps": steps,
                          "duration_s": duration_s, "days": duration_s / 86400, "energy_j": energy_j,
                          "energy_kwh": energy_j / 3.6e6}
        result["comm_bound"] = best.comm_s > _step_time(best, pb, m, c, micro_batch, mfu)[0]
        result["uses_offload"] = best.offload != "none"
        result["uses_ep"] = best.ep_size > 1
        result["fits_without_offload"] = any(o.offload == "none" for o in fitting)
        result["fits_without_ep"] = any(o.ep_size == 1 for o in fitting)
    else:
        closest = min(options, key=lambda o: o.gpu_total_bytes / limit_gpu + o.cpu_bytes_per_node / limit_cpu)
        need_gpu = closest.gpu_total_bytes / USABLE_FRACTION
        need_cpu = closest.cpu_bytes_per_node / USABLE_FRACTION
        result["advice"] = (f"nothing fits; the closest option (ZeRO-{closest.zero_stage}, EP {closest.ep_size}, "
                            f"offload {closest.offload}) needs {need_gpu / 2**30:.1f} GiB per GPU and "
                            f"{need_cpu / 2**30:.0f} GiB host memory per node ({closest.why_not}); "
                            f"add GPUs, larger-memory GPUs or host memory")
    return result


def parse_size(text: str) -> float:
    """``32GB``/``32G``/``32GiB``/``512gb`` → bytes (decimal GB = GiB here: vendors quote GPU memory in GiB)."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise ValueError(f"bad size {text!r}; expected e.g. 32GB, 80G, 1.5TB") from None
