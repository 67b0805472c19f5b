"""Pseudo-to-Real (M6-10T, arXiv 2110.03888): delink the shared layers mid-run, carry optimizer state, rebuild."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def delink_and_rebuild(engine: Any, sched: Any, cfg: Any, *, world: int, on_gpu: bool, ep: int) -> tuple[Any, Any]:
    """Give each layer its own weights (outputs unchanged), copy the shared weights' Adam state
    (moments, step, host master copies) to every per-layer copy, and build a fresh engine.

    Runs with ZeRO stage 0, where the optimizer keeps per-parameter state; the delink step is
    a small part of a long run, so the pseudo phase does not need ZeRO partitioning.
    """
    from m6.train.engine import build_engine

    model = engine.module.model
    opt = engine.optimizer
    old = {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state.get(p, {}).items()}
           for n, p in model.named_parameters()}
    sched_state = sched.state_dict()
    mapping = model.delink()
    source = {new: shared for shared, news in mapping.items() for new in news}
    engine2, opt2, sched2 = build_engine(model, cfg, world_size=world, on_gpu=on_gpu, ep_size=ep)
    carried = 0
    for n, p in model.named_parameters():
        st = old.get(source.get(n, n))
        if st:
            opt2.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            carried += 1
    sched2.load_state_dict(sched_state)
    log.info("Pseudo-to-Real: %d shared tensors became %d per-layer tensors; optimizer state carried for %d",
             len(mapping), len(source), carried)
    return engine2, sched2
