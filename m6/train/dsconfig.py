"""DeepSpeed JSON generated from :class:`m6.config.TrainConfig`, and the offload spec parser."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from m6.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class OffloadPlan:
    """Where optimizer state (and, for granular offload, layer parameters) live.

    Attributes:
        mode: ``none``, ``optimizer`` (ZeRO-Offload of all optimizer state) or ``granular``.
        layers: for ``granular``: the transformer layer indices whose optimizer state and
            fp32 master weights live on the CPU (M6-10T granular offloading, arXiv 2110.03888 §3.3).
    """

    mode: str
    layers: tuple[int, ...] = ()


def parse_offload(spec: str, n_layers: int) -> OffloadPlan:
    """Parse ``none`` | ``optimizer`` | ``granular:FRACTION`` (``0.5``) | ``granular:0,1,5`` (layer list).

    A fraction picks the first ``ceil(fraction × n_layers)`` layers: in a pre-LN stack
    the deep layers stay on the device, where their gradients arrive first in the
    backward pass and can be applied while offloaded shallow layers are still copying.

    Raises:
        ConfigError: naming ``train.offload`` and what is wrong with it.
    """
    if spec in ("none", "optimizer"):
        return OffloadPlan(mode=spec)
    if not spec.startswith("granular:"):
        raise ConfigError(f"train.offload: must be none|optimizer|granular:FRACTION|granular:LAYERS, got {spec!r}")
    body = spec.split(":", 1)[1].strip()
    if not body:
        raise ConfigError("train.offload: granular needs a fraction (granular:0.5) or a layer list (granular:0,2)")
    if "." not in body:  # an integer list names layers; a fraction always has a decimal point
        try:
            layers = tuple(sorted({int(x) for x in body.split(",") if x.strip()}))
        except ValueError:
            raise ConfigError(f"train.offload: bad layer list {body!r}; expected integers like 0,1,5") from None
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"train.offload: layer(s) {bad} out of range for a {n_layers}-layer model")
        return OffloadPlan(mode="granular", layers=layers)
    try:
        frac = float(body)
    except ValueError:
        raise ConfigError(f"train.offload: bad granular fraction {body!r}; expected a number in (0, 1]") from None
    if not 0.0 < frac <= 1.0:
        raise ConfigError(f"train.offload: granular fraction must be in (0, 1], got {frac}")
    k = max(1, math.ceil(frac * n_layers))
    return OffloadPlan(mode="granular", layers=tuple(range(k)))


def resolve_precision(train: TrainConfig, on_gpu: bool) -> str:
    """``fp32`` or ``bf16``: 'auto' means bf16 on GPUs and fp32 on the CPU (no fast bf16 GEMMs there)."""
    if train.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return train.precision


def trainer_clips(train: TrainConfig, on_gpu: bool) -> bool:
    """True when the trainer, not DeepSpeed, clips gradients (fp32 without ZeRO)."""
    return train.zero_stage == 0 and resolve_precision(train, on_gpu) == "fp32"


def deepspeed_config(train: TrainConfig, *, world_size: int, on_gpu: bool, n_layers: int) -> dict[str, Any]:
    """The DeepSpeed JSON for one run; never kept by hand.

    The optimizer and LR schedule are built by the trainer (the schedule is a warmup +
    cosine lambda, and granular offload needs its own optimizer), so the JSON carries
    batch sizes, ZeRO, offload, precision, clipping and activation checkpointing.

    Raises:
        ConfigError: on combinations DeepSpeed cannot run (named by field).
    """
    offload = parse_offload(train.offload, n_layers)
    if world_size % train.ep_size:
        raise ConfigError(f"train.ep_size: {train.ep_size} does not divide the world size {world_size}")
    if offload.mode == "granular" and train.zero_stage != 0:
        # ZeRO 1-3 flatten parameters into partitioned buffers, which loses the per-layer identity
        # granular placement needs; granular offload is the non-ZeRO alternative to ZeRO-Offload.
        raise ConfigError("train.offload: granular offload runs with train.zero_stage 0 (ZeRO flattens layers away)")
    if offload.mode == "optimizer" and train.zero_stage == 0:
        raise ConfigError("train.offload: optimizer offload (ZeRO-Offload) needs train.zero_stage >= 1")
    if train.p2r_delink_step is not None and train.zero_stage != 0:
        # Carrying Adam state from a shared tensor to its per-layer copies needs per-parameter
        # optimizer state; ZeRO keeps flat partitions instead.
        raise ConfigError("train.p2r_delink_step: Pseudo-to-Real runs with train.zero_stage 0")
    if train.zero_stage == 3 and train.objective_weights.get("contrastive", 0) > 0:
        # The contrastive objective runs the encoder twice (images, texts) before one backward;
        # ZeRO-3 then reduces a parameter twice in one bucket and asserts (DeepSpeed issue #5321).
        raise ConfigError("train.objective_weights: the contrastive objective cannot run under ZeRO-3 "
                          "(DeepSpeed cannot reduce a parameter used twice in one step); set its weight to 0 "
                          "or use train.zero_stage <= 2")
    precision = resolve_precision(train, on_gpu)
    if offload.mode == "granular" and precision != "fp32":
        # DeepSpeed's bf16 optimizer flattens the parameters it hands to the client optimizer.
        raise ConfigError("train.offload: granular offload runs in fp32; set train.precision to fp32")
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu, reduce_scatter=True,
                    reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7))
    if train.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=int(1e4), stage3_gather_16bit_weights_on_model_save=False)
    if offload.mode == "optimizer":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        # In fp32 without ZeRO the trainer clips itself (m6.train.engine.clip_gradients): DeepSpeed's
        # fp32 stage-0 clipping breaks on 0-dim parameters and is not expert-parallel aware.
        "gradient_clipping": 0.0 if trainer_clips(train, on_gpu) else train.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
    }
    return cfg


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr × min_lr_ratio`` at ``steps`` (a multiplier of lr)."""
    if train.warmup_steps > 0 and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    cos = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * cos
