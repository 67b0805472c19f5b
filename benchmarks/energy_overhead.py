"""Energy-tracker overhead: step time of demo-preset training with the monitor on versus off, interleaved.

Each block trains ``--steps`` steps (forward + backward + AdamW) of the demo M6Model on
synthetic batches, either bare or with a running EnergyMonitor whose ``step`` is called
at every step boundary. Blocks alternate on/off (order flipped every other pair) so drift
on a shared host hits both alike; medians of per-step times and the median of paired
block ratios are reported. Also measured: the cost of one ``step`` call and of one
``window`` enter/exit, and the sampler thread's CPU time per second of run.

    python benchmarks/energy_overhead.py [--pairs 8] [--steps 6] [--preset demo] [--plot energy_overhead.png]
    python benchmarks/energy_overhead.py --accuracy 10    # attribution error on the NVML test double
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from m6.config import EnergyConfig, preset  # noqa: E402
from m6.energy.monitor import EnergyMonitor  # noqa: E402
from m6.model.m6 import M6Model  # noqa: E402

log = logging.getLogger("energy_overhead")


def _batch(cfg, B: int, step: int) -> tuple[str, dict]:
    g = torch.Generator().manual_seed(step)
    text = torch.randint(5, cfg.vocab_size, (B, cfg.max_text_len), generator=g)
    text[:, 0], text[:, -1] = 1, 2
    image = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    return ("text", "caption", "mm", "contrastive")[step % 4], {"image": image, "text": text}


def run_block(model, opt, cfg, B: int, steps: int, first_step: int, monitor: EnergyMonitor | None,
              cpu_times: list[float] | None = None) -> list[float]:
    """Train ``steps`` steps; returns each step's wall time in seconds (and appends its thread CPU time)."""
    times = []
    for s in range(first_step, first_step + steps):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        objective, batch = _batch(cfg, B, s)
        loss = model(batch, objective)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(s, B * cfg.max_text_len)
        times.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.thread_time() - c0)
    return times


def bootstrap_median_ci(xs: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the median of ``xs``."""
    import random

    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return [meds[int(0.025 * n)], meds[int(0.975 * n) - 1]]


def call_costs(n: int = 20000) -> dict:
    """Median cost of ``step`` and of a ``window`` enter/exit, in microseconds, on a running monitor."""
    mon = EnergyMonitor(EnergyConfig(), run_id="calls").start()
    reps = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(n):
            mon.step(i, 1)
        reps.append((time.perf_counter() - t0) / n * 1e6)
    wins = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n // 10):
            with mon.window("w"):
                pass
        wins.append((time.perf_counter() - t0) / (n // 10) * 1e6)
    mon.stop()
    return {"step_call_us": statistics.median(reps), "window_us": statistics.median(wins)}


def accuracy(reps: int) -> dict:
    """Window and run figures against the true energy of the test suite's NVML double.

    The double's counter advances every 100 ms and its power reads are 1-s averages of a
    bursty profile (50-ms slots between 200 and 350 W), like a data-centre GPU's.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "energy"))
    from fakes import fake_nvml

    from m6.energy.nvml import open_gpu_sensors

    win, run, check = [], [], []
    for r in range(reps):
        nv = fake_nvml(1)
        gpu = nv.gpus[0].profile
        mon = EnergyMonitor(EnergyConfig(sample_hz=10), run_id="acc", sensors=open_gpu_sensors(0, nvml=nv)).start()
        time.sleep(0.3 + 0.013 * r)  # vary the phase against the counter's updates
        with mon.window("w"):
            time.sleep(0.7)
        time.sleep(0.2)
        doc = mon.stop()
        w = next(x for x in doc["windows"] if x["stage"] == "w")
        w_true = gpu.energy_j(mon.t0_s + w["t1_s"]) - gpu.energy_j(mon.t0_s + w["t0_s"])
        win.append(w["energy_j"] / w_true - 1)
        run.append(doc["totals"]["it_energy_j"] / (gpu.energy_j(mon.t1_s) - gpu.energy_j(mon.t0_s)) - 1)
        check.append(doc["cross_checks"][0]["diff_rel"])
    pct = lambda xs: {"median_abs_pct": statistics.median(abs(x) for x in xs) * 100,  # noqa: E731
                      "max_abs_pct": max(abs(x) for x in xs) * 100}
    return {"reps": reps, "window_0.7s_error": pct(win), "run_error": pct(run),
            "power_integration_vs_counter": pct(check)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--pairs", type=int, default=8, help="on/off block pairs")
    ap.add_argument("--steps", type=int, default=6, help="training steps per block")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default: the preset's)")
    ap.add_argument("--sample-hz", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--plot", default=None, help="write a PNG of per-step times")
    ap.add_argument("--accuracy", type=int, default=0, metavar="N",
                    help="instead: N windows on the test NVML double, errors against its true energy")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.accuracy:
        acc = accuracy(args.accuracy)
        print(json.dumps(acc) if args.json else "\n".join(
            f"{k}: median |error| {v['median_abs_pct']:.3f}%, max {v['max_abs_pct']:.3f}%"
            for k, v in acc.items() if isinstance(v, dict)) + f"\n({acc['reps']} runs)")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = preset(args.preset)
    cfg, B = c.model, args.batch or c.train.micro_batch_size
    model = M6Model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run_block(model, opt, cfg, B, 2, 0, None)  # warm-up: allocator, autograd graph caches

    on, off, ratios, sampler_cpu_per_s = [], [], [], []
    # Wall time on a shared host includes waiting for a core; the training thread's own CPU time
    # does not, so it shows what the monitor adds to the step's work with far less noise.
    cpu_on, cpu_off = [], []
    step = 2
    t_start = time.monotonic()
    for p in range(args.pairs):
        order = ("off", "on") if p % 2 == 0 else ("on", "off")
        block = {}
        for mode in order:
            mon = EnergyMonitor(EnergyConfig(sample_hz=args.sample_hz), run_id="bench").start() if mode == "on" else None
            times = run_block(model, opt, cfg, B, args.steps, step, mon, cpu_on if mode == "on" else cpu_off)
            step += args.steps
            if mon is not None:
                doc = mon.stop()
                sampler_cpu_per_s.append(doc["overhead"]["sampler_cpu_s"] / max(1e-9, doc["duration_s"]))
            block[mode] = statistics.median(times)
            (on if mode == "on" else off).extend(times)
        ratios.append(block["on"] / block["off"])
        done = p + 1
        eta = (time.monotonic() - t_start) / done * (args.pairs - done)
        log.info("pair %d/%d: off %.1f ms, on %.1f ms (ratio %.4f), ETA %.0f s", done, args.pairs,
                 block["off"] * 1e3, block["on"] * 1e3, ratios[-1], eta)
    costs = call_costs()
    med_off, med_on = statistics.median(off), statistics.median(on)
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    ci = bootstrap_median_ci(ratios)
    res = {"preset": args.preset, "batch": B, "steps_per_block": args.steps, "pairs": args.pairs,
           "sample_hz": args.sample_hz, "torch_threads": args.threads,
           "median_step_off_ms": med_off * 1e3, "median_step_on_ms": med_on * 1e3,
           "overhead_pct_of_medians": (med_on / med_off - 1) * 100,
           "paired_ratio_median": statistics.median(ratios), "paired_ratio_iqr": [q[0], q[2]],
           "paired_ratio_ci95": ci,
           "median_step_cpu_off_ms": statistics.median(cpu_off) * 1e3,
           "median_step_cpu_on_ms": statistics.median(cpu_on) * 1e3,
           "sampler_cpu_s_per_s": statistics.median(sampler_cpu_per_s), **costs,
           "step_call_pct_of_step": costs["step_call_us"] / (med_off * 1e6) * 100}
    # CPU-time view: the training thread's extra work plus the sampler's CPU over the same step.
    res["cpu_overhead_pct"] = ((res["median_step_cpu_on_ms"] + res["sampler_cpu_s_per_s"] * med_on * 1e3)
                               / res["median_step_cpu_off_ms"] - 1) * 100
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
        ax.hist([x * 1e3 for x in off], bins=30, alpha=0.6, label="monitor off")
        ax.hist([x * 1e3 for x in on], bins=30, alpha=0.6, label="monitor on")
        ax.set_xlabel("step time (ms)")
        ax.legend()
        ax.set_title(f"{args.preset}: overhead {res['overhead_pct_of_medians']:+.2f}% (medians)", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.preset} preset, batch {B}, {args.pairs} interleaved pairs × {args.steps} steps")
        print(f"  median step: off {res['median_step_off_ms']:.2f} ms, on {res['median_step_on_ms']:.2f} ms "
              f"-> overhead {res['overhead_pct_of_medians']:+.2f}%")
        print(f"  paired block ratio on/off: median {res['paired_ratio_median']:.4f}, "
              f"IQR {res['paired_ratio_iqr'][0]:.4f}-{res['paired_ratio_iqr'][1]:.4f}, "
              f"95% CI of the median {ci[0]:.4f}-{ci[1]:.4f}")
        print(f"  training-thread CPU per step: off {res['median_step_cpu_off_ms']:.2f} ms, on "
              f"{res['median_step_cpu_on_ms']:.2f} ms; with the sampler's CPU added -> overhead "
              f"{res['cpu_overhead_pct']:+.2f}%")
        print(f"  step() call {res['step_call_us']:.2f} us ({res['step_call_pct_of_step']:.5f}% of a step), "
              f"window enter+exit {res['window_us']:.2f} us")
        print(f"  sampler thread CPU: {res['sampler_cpu_s_per_s'] * 1e3:.2f} ms per second of run "
              f"at {args.sample_hz:g} Hz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
