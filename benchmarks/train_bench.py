"""Training throughput: `m6 train` (our MoE layer) vs the same model with DeepSpeed's MoE layer, interleaved.

    .venv/bin/python benchmarks/train_bench.py [--reps 3] [--steps 60]

Both arms run the demo preset on 2 CPU processes (gloo), expert parallelism 2, through the
same trainer; the baseline swaps every MoE FFN for ``deepspeed.moe.layer.MoE`` (top-1 gate,
capacity factor 2, the same GELU expert MLPs; ours is dropless). Tokens/s is the median over log
intervals after the first (warm-up), then the median over repetitions; arms alternate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from _corpus import demo_dataset  # beside this script

REPO = Path(__file__).resolve().parents[1]
CAPACITY_FACTOR = 2.0
"""DeepSpeed's gate in its dropless mode fails in this version (a tensor capacity reaches topk), so
the baseline runs with capacity factor 2: rarely dropping, and the padded dispatch it implies."""


class DeepSpeedMoEFFN(nn.Module):
    """Adapter: DeepSpeed's MoE layer behind the interface of m6.model.moe.MoE (``y, aux = f(x, mask)``)."""

    def __init__(self, cfg, ep_group=None):
        super().__init__()
        from deepspeed.moe.layer import MoE as DSMoE

        import torch.distributed as dist

        ep = dist.get_world_size(ep_group) if ep_group is not None else 1
        expert = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff, bias=False), nn.GELU(),
                               nn.Linear(cfg.d_ff, cfg.d_model, bias=False))
        self.cfg, self.ep_group, self.ep = cfg, ep_group, ep
        self.moe = DSMoE(hidden_size=cfg.d_model, expert=expert, num_experts=cfg.num_experts, ep_size=ep,
                         k=cfg.top_k, capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR,
                         drop_tokens=True, use_rts=False)
        self.last_stats: dict = {}

    def forward(self, x, token_mask=None):
        import torch.distributed as dist

        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]
        # DeepSpeed's dropless gate sizes its all-to-all from the largest expert load in the EP group
        # but caps it at the local token count, so ranks must hold equally many tokens: pad, and mask
        # the padding out of routing with DeepSpeed's own used_token argument.
        t_max = torch.tensor([T])
        if self.ep > 1:
            dist.all_reduce(t_max, op=dist.ReduceOp.MAX, group=self.ep_group)
        pad = int(t_max) - T
        used = torch.ones(T + pad, dtype=x.dtype, device=x.device)
        if pad:
            x_TD = torch.cat([x_TD, x_TD.new_zeros(pad, shape[-1])])
            used[T:] = 0
        y, aux, counts = self.moe(x_TD, used)
        y = y[:T].reshape(shape)
        c = counts.float()
        cap = math.ceil(int(t_max) / self.cfg.num_experts * CAPACITY_FACTOR)
        dropped = int((c - cap).clamp(min=0).sum())
        self.last_stats = {"tokens": T, "assignments": T * self.cfg.top_k, "tokens_per_expert": counts.tolist(),
                           "dropped": dropped, "drop_rate": dropped / max(1, T), "load_cv": float(c.std(unbiased=False) / c.mean()),
                           "router_entropy": 0.0, "capacity": None, "aux_loss": float(aux.detach())}
        return y, self.cfg.aux_loss_coef * aux


def worker(argv: list[str]) -> int:
    """One rank of the baseline arm: the regular trainer with the MoE FFN class swapped."""
    sys.path.insert(0, str(REPO))
    import m6.model.transformer as tr
    from m6.train import worker as w

    tr.MoE = DeepSpeedMoEFFN
    return w.main(argv)


def run_arm(arm: str, data: str, out: str, steps: int) -> float:
    from m6.config import preset
    from m6.train.launch import train

    cfg = preset("demo")
    # Micro-batch 16: the setting BENCHMARKS.md's figures were measured with (the preset now trains at 32).
    cfg.train = dataclasses.replace(cfg.train, steps=steps, ep_size=2, zero_stage=0, log_every=10, save_every=steps,
                                    warmup_steps=5, micro_batch_size=16)
    cfg.energy = dataclasses.replace(cfg.energy, enabled=False)
    cmd = None if arm == "m6" else [sys.executable, str(Path(__file__).resolve()), "--worker"]
    train(cfg, data, out, nproc=2, log_sink=open(out + ".log", "w"), worker_cmd=cmd)
    rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[1:])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--data", help="curated dataset (default: a synthetic corpus made here)")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="m6-train-bench-")
    data = a.data or demo_dataset(tmp, n=1000)
    results: dict[str, list[float]] = {"m6": [], "deepspeed": []}
    t0 = time.monotonic()
    for rep in range(a.reps):
        for arm in (("m6", "deepspeed") if rep % 2 == 0 else ("deepspeed", "m6")):
            tps = run_arm(arm, data, f"{tmp}/{arm}-{rep}", a.steps)
            results[arm].append(tps)
            print(f"rep {rep} {arm:9s} {tps:8.0f} tokens/s  ({time.monotonic() - t0:.0f} s elapsed)", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    summary = {"tokens_per_s": results, "median": med, "ratio_m6_over_deepspeed": med["m6"] / med["deepspeed"],
               "torch_threads": torch.get_num_threads(), "steps": a.steps, "reps": a.reps}
    print(json.dumps(summary, indent=1))
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "train_bench.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
