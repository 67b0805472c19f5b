"""Pseudo-to-Real (M6-10T, arXiv 2110.03888): delink the shared layers mid-run, carry optimizer state, rebuild."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def _opt_state(engine: Any, p: torch.nn.Parameter) -> dict[str, Any]:
    """Adam moments and step of one parameter, whole (ZeRO-1/2 partitions are gathered: collective)."""
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        from deepspeed.utils import safe_get_full_optimizer_state

        return {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
    st = opt.state.get(p, {})
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}


def _zero_step(engine: Any) -> Any:
    inner = engine.optimizer.optimizer
    for st in inner.state.values():
        if "step" in st:
            return st["step"]
    return None


def delink_and_rebuild(engine: Any, sched: Any, cfg: Any, *, world: int, on_gpu: bool, ep: int) -> tuple[Any, Any]:
    """Give each layer its own weights (outputs unchanged), move Adam state to the new per-layer
    parameters, and build a fresh engine around the real model. Collective on every rank."""
    from m6.train.engine import build_engine

    model = engine.module.model
    zero = hasattr(engine.optimizer, "single_partition_of_fp32_groups")
    old = {n: _opt_state(engine, p) for n, p in model.named_parameters()}
    step_value = _zero_step(engine) if zero else None
    sched_state = sched.state_dict()
    if hasattr(engine, "destroy"):
        engine.destroy()  # removes DeepSpeed's gradient hooks from parameters the new engine reuses
    mapping = model.delink()
    source = {new: shared for shared, news in mapping.items() for new in news}
    engine2, opt2, sched2 = build_engine(model, cfg, world_size=world, on_gpu=on_gpu, ep_size=ep)
    params = dict(model.named_parameters())
    if zero:
        from deepspeed.utils import safe_set_full_optimizer_state

        for n, p in params.items():
            st = old.get(source.get(n, n))
            for k in ("exp_avg", "exp_avg_sq"):
                if st and st.get(k) is not None:
                    safe_set_full_optimizer_state(p, st[k], k)
        if step_value is not None:
            for st in opt2.optimizer.state.values():
                if "step" in st:
                    st["step"] = step_value.clone() if torch.is_tensor(step_value) else step_value
    else:
        for n, p in params.items():
            st = old.get(source.get(n, n))
            if st:
                opt2.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    sched2.load_state_dict(sched_state)
    return engine2, sched2
