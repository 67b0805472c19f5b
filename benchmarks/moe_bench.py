"""MoE layer benchmark: forward+backward time per token as a ratio to a dense FFN, vs DeepSpeed's MoE and a per-expert loop.

Every variant runs the same expert math (GELU MLP d → d_ff → d, no biases) with the
same router weights, so the layers route identically. Repetitions are interleaved
(one round = every variant once, in a fresh shuffled order) and the reported ratio
is the median over rounds of time(variant) / time(dense FFN) within the round,
which cancels most of the load from other processes on a shared machine. The dense
floor of a top-k MoE is a dense FFN of the expert's size on k × tokens rows.

Clock: with one intra-op thread (the default, ``--threads 1``) each call is timed by
the thread's CPU time, which other processes on a shared machine do not inflate;
with more threads, by wall time.

Memory: bytes of the activations each variant saves for its backward (deduplicated
by storage, parameters excluded), i.e. what is held between forward and backward.

Variants: ``m6`` (the layer as shipped: sorted dispatch, one fused expert-MLP
autograd node), ``m6 grouped_mm`` (same with ``torch._grouped_mm`` forced), ``naive
loop`` (the common reference MoE: for each expert, mask its tokens, gather, MLP,
index_add, under plain autograd), and DeepSpeed's ``deepspeed.moe.layer.MoE``.

    .venv/bin/python benchmarks/moe_bench.py --out moe_bench.json   # full table (~10 min on 2 cores)
    .venv/bin/python benchmarks/moe_bench.py --tokens 2048 --reps 3 --experts 8,16   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m6.model.moe import MoE, MoEConfig  # noqa: E402


def dense_ffn(d: int, f: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, f, bias=False), nn.GELU(), nn.Linear(f, d, bias=False))


class NaiveLoopMoE(nn.Module):
    """The per-expert loop found in most reference MoE code: one boolean mask per expert."""

    def __init__(self, ours: MoE):
        super().__init__()
        self.router = ours.router
        self.experts = ours.experts

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        r = self.router(x_TD)
        y = torch.zeros_like(x_TD)
        for e, (w1, w2) in enumerate(zip(self.experts.w1_EDF.unbind(0), self.experts.w2_EFD.unbind(0))):
            tok, slot = torch.where(r.expert_TK == e)
            if tok.numel():
                h = torch.nn.functional.gelu(x_TD[tok] @ w1) @ w2
                y = y.index_add(0, tok, h * r.weight_TK[tok, slot].unsqueeze(1))
        return y + 0.0 * r.aux_loss


def init_dist() -> None:
    """DeepSpeed's MoE needs its communication backend up, even on one process."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="gloo")


def deepspeed_moe(ours: MoE, *, k: int, capacity_factor: float | None):
    """``deepspeed.moe.layer.MoE`` holding exactly ``ours``' router and expert weights."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.moe.layer import MoE as DSMoE

    cfg = ours.cfg
    layer = DSMoE(hidden_size=cfg.d_model, expert=dense_ffn(cfg.d_model, cfg.d_ff), num_experts=cfg.num_experts,
                  ep_size=1, k=k, capacity_factor=capacity_factor or 1.0, eval_capacity_factor=capacity_factor or 1.0,
                  min_capacity=0, drop_tokens=capacity_factor is not None, use_rts=False,
                  top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight_ED)
        for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            expert[0].weight.copy_(ours.experts.w1_EDF[e].t())
            expert[2].weight.copy_(ours.experts.w2_EFD[e].t())
    return layer


def saved_bytes(fn, modules) -> int:
    """Bytes of distinct non-parameter storages autograd keeps for the backward of ``fn()``."""
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def make_variants(E: int, k: int, T: int, d: int, f: int, x: torch.Tensor, with_ds: bool) -> dict:
    """name → (forward callable returning the output, parameters to clear)."""
    torch.manual_seed(E * 10 + k)
    ours = MoE(MoEConfig(d_model=d, d_ff=f, num_experts=E, top_k=k))
    gmm = MoE(MoEConfig(d_model=d, d_ff=f, num_experts=E, top_k=k))
    gmm.load_state_dict(ours.state_dict())
    gmm.experts.method = "grouped"
    naive = NaiveLoopMoE(ours)
    v = {
        f"m6 E={E} top{k}": (lambda: ours(x)[0], ours),
        f"m6 grouped_mm E={E} top{k}": (lambda: gmm(x)[0], gmm),
        f"naive loop E={E} top{k}": (lambda: naive(x), naive),
    }
    if with_ds:
        ds_dl = deepspeed_moe(ours, k=k, capacity_factor=None)
        v[f"deepspeed dropless E={E} top{k}"] = (lambda: ds_dl(x)[0], ds_dl)
        if k == 1:
            ds_cf = deepspeed_moe(ours, k=k, capacity_factor=1.25)
            v[f"deepspeed cf=1.25 E={E} top{k}"] = (lambda: ds_cf(x)[0], ds_cf)
    return v


CLOCK = time.perf_counter


def timed(fn, grad: torch.Tensor, module: nn.Module, x: torch.Tensor) -> float:
    for p in module.parameters():
        p.grad = None
    x.grad = None
    t0 = CLOCK()
    fn().backward(grad)
    return CLOCK() - t0


def plot(result: dict, path: str) -> None:
    """Bar chart of time and saved-activation memory relative to the dense FFN, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r["variant"].startswith("dense")]
    names = [r["variant"] for r in rows]
    colors = ["tab:blue" if n.startswith("m6") else "tab:orange" if n.startswith("deepspeed") else "tab:gray"
              for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) + 1.5), sharey=True)
    for ax, key, title in ((axes[0], "x_dense", "fwd+bwd time / dense FFN"),
                           (axes[1], "mem_x_dense", "saved activations / dense FFN")):
        ax.barh(range(len(rows)), [r[key] for r in rows], color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(title)
    axes[0].set_yticks(range(len(rows)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"MoE layer, fp32 CPU, {result['tokens']} tokens, d={result['d_model']}, d_ff={result['d_ff']} "
                 f"({result['clock']}, median of {result['reps']} interleaved rounds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=2048)
    ap.add_argument("--experts", default="8,16,64", help="expert counts for the top-1 rows")
    ap.add_argument("--top2-experts", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: time by thread CPU time)")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here (and a PNG plot next to it)")
    ap.add_argument("--replot", default=None, help="only redraw the plot of an earlier --out JSON")
    args = ap.parse_args(argv)
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        plot(result, str(Path(args.replot).with_suffix(".png")))
        return result
    T, d, f = args.tokens, args.d_model, args.d_ff
    global CLOCK
    torch.set_num_threads(args.threads)
    CLOCK = time.thread_time if args.threads == 1 else time.perf_counter
    with_ds = not args.no_deepspeed
    if with_ds:
        init_dist()
    torch.manual_seed(0)
    x = torch.randn(T, d, requires_grad=True)
    x2 = torch.randn(2 * T, d, requires_grad=True)
    g, g2 = torch.randn(T, d), torch.randn(2 * T, d)
    dense1, dense2 = dense_ffn(d, f), dense_ffn(d, f)

    groups = []  # (baseline name, baseline fn, module, input, grad, {variant: (fn, module)})
    variants = {}
    for E in [int(e) for e in args.experts.split(",")]:
        variants.update(make_variants(E, 1, T, d, f, x, with_ds))
    top2 = make_variants(args.top2_experts, 2, T, d, f, x, with_ds)
    groups.append(("dense T rows", lambda: dense1(x), dense1, x, g, variants))
    groups.append(("dense 2T rows", lambda: dense2(x2), dense2, x2, g2, top2))

    # Sanity: identical routing means identical top-1 outputs for our layer and DeepSpeed's dropless layer.
    if with_ds:
        with torch.no_grad():
            for name, (fn, _) in variants.items():
                if name.startswith("deepspeed dropless"):
                    ours_name = name.replace("deepspeed dropless", "m6")
                    diff = float((fn() - variants[ours_name][0]()).abs().max())
                    print(f"check {name} vs ours: max |Δy| = {diff:.2e}", flush=True)

    for _, base_fn, base_mod, inp, grad, vs in groups:  # warm-up: first calls allocate and pick kernels
        timed(base_fn, grad, base_mod, inp)
        for fn, mod in vs.values():
            timed(fn, g, mod, x)

    times: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    start = time.perf_counter()
    for rep in range(args.reps):
        for base_name, base_fn, base_mod, inp, grad, vs in groups:
            order = list(vs.items())
            random.Random(rep).shuffle(order)
            b0 = timed(base_fn, grad, base_mod, inp)
            for name, (fn, mod) in order:
                t = timed(fn, g, mod, x)
                times.setdefault(name, []).append(t)
                ratios.setdefault(name, []).append(t / b0)
            b1 = timed(base_fn, grad, base_mod, inp)  # baseline bracketing the round
            times.setdefault(base_name, []).extend([b0, b1])
            for name in vs:
                ratios[name][-1] = times[name][-1] / ((b0 + b1) / 2)
        done = rep + 1
        el = time.perf_counter() - start
        print(f"round {done}/{args.reps}  {el:.0f}s elapsed, ETA {el / done * (args.reps - done):.0f}s", flush=True)

    mem = {"dense T rows": saved_bytes(lambda: dense1(x), [dense1]),
           "dense 2T rows": saved_bytes(lambda: dense2(x2), [dense2])}
    for _, _, _, _, _, vs in groups:
        for name, (fn, mod) in vs.items():
            mem[name] = saved_bytes(fn, [mod])

    rows = []
    for base_name, _, _, inp, _, vs in groups:
        bt = statistics.median(times[base_name])
        rows.append({"variant": base_name, "ms": bt * 1e3, "us_per_token": bt / T * 1e6, "x_dense": 1.0,
                     "saved_MiB": mem[base_name] / 2**20, "mem_x_dense": 1.0})
        for name in vs:
            t = statistics.median(times[name])
            rows.append({"variant": name, "ms": t * 1e3, "us_per_token": t / T * 1e6,
                         "x_dense": statistics.median(ratios[name]),
                         "saved_MiB": mem[name] / 2**20, "mem_x_dense": mem[name] / mem[base_name]})
    clock = "thread CPU time" if CLOCK is time.thread_time else "wall time"
    print(f"\nfp32 CPU, tokens={T}, d={d}, d_ff={f}, reps={args.reps}, threads={torch.get_num_threads()}, {clock}")
    print(f"{'variant':38s} {'ms':>9s} {'us/token':>9s} {'x dense':>8s} {'saved MiB':>10s} {'mem x dense':>11s}")
    for r in rows:
        print(f"{r['variant']:38s} {r['ms']:9.1f} {r['us_per_token']:9.2f} {r['x_dense']:8.3f} "
              f"{r['saved_MiB']:10.1f} {r['mem_x_dense']:11.2f}")
    result = {"tokens": T, "d_model": d, "d_ff": f, "reps": args.reps, "threads": torch.get_num_threads(),
              "clock": clock, "torch": torch.__version__, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        plot(result, str(Path(args.out).with_suffix(".png")))
    return result


if __name__ == "__main__":
    main()
