"""One rank of the expert-parallel check: the sharded MoE layer must equal the full layer on this rank's tokens.

Run by test_moe_expert_parallel.py as two processes (gloo); exits non-zero on a mismatch.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from m6.model.moe import MoE, MoEConfig


def check(case: dict, rank: int, world: int) -> dict:
    cfg = MoEConfig(d_model=16, d_ff=32, **case)
    torch.manual_seed(0)  # identical full layer on every rank
    full = MoE(cfg)
    with torch.no_grad():
        full.router.weight_ED.normal_(std=0.5)
    sharded = MoE(cfg, ep_group=dist.group.WORLD)
    El = cfg.num_experts // world
    with torch.no_grad():
        sharded.router.weight_ED.copy_(full.router.weight_ED)
        sharded.experts.w1_EDF.copy_(full.experts.w1_EDF[rank * El:(rank + 1) * El])
        sharded.experts.w2_EFD.copy_(full.experts.w2_EFD[rank * El:(rank + 1) * El])

    # Different token counts per rank exercise uneven all-to-all splits.
    xs = [torch.randn(7 + 5 * r, 16, generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    gs = [torch.randn_like(x) for x in xs]
    x = xs[rank].clone().requires_grad_()
    y, aux = sharded(x)
    ((y * gs[rank]).sum() + aux).backward()
    router_grad = sharded.router.weight_ED.grad.clone()
    dist.all_reduce(router_grad)  # what data parallelism does to the replicated router

    # Reference: the full layer run separately on each rank's tokens (capacity is per rank, as in the sharded layer).
    ref_x = [xi.clone().requires_grad_() for xi in xs]
    ref_loss = 0
    ref_y = []
    for xi, gi in zip(ref_x, gs):
        yi, ai = full(xi)
        ref_y.append(yi)
        ref_loss = ref_loss + (yi * gi).sum() + ai
    ref_loss.backward()
    sl = slice(rank * El, (rank + 1) * El)
    err = {
        "y": float((y - ref_y[rank]).abs().max()),
        "x_grad": float((x.grad - ref_x[rank].grad).abs().max()),
        "w1_grad": float((sharded.experts.w1_EDF.grad - full.experts.w1_EDF.grad[sl]).abs().max()),
        "w2_grad": float((sharded.experts.w2_EFD.grad - full.experts.w2_EFD.grad[sl]).abs().max()),
        "router_grad": float((router_grad - full.router.weight_ED.grad).abs().max()),
        "dropped": sharded.last_stats["dropped"],
        "group_name": sharded.experts.w1_EDF.group_name,
    }
    return err


def main() -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cases = json.loads(sys.argv[1])
    results = [check(c, rank, world) for c in cases]
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
