"""``make run``: every stage, locally, on the embedded default — synthesize → curate → train → evaluate + gate.

The stages run here as library calls in order, the same functions the pipeline
components call; energy is tracked for each stage and summarised at the end.

    python -m m6.demo --out runs/local            # what `make run` does
    python -m m6.demo --out runs/quick --n 400 --steps 20 --preset tiny --nproc 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid

from m6 import storage
from m6.config import preset

log = logging.getLogger("m6.demo")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _stage(name: str) -> None:
    _say(f"\n=== {name} " + "=" * max(0, 66 - len(name)))


def promote(eval_doc: dict, eval_uri: str, model_uri: str, champion_uri: str) -> None:
    """Make the candidate the champion: its ``eval.json`` and a pointer to its model go beside each other."""
    storage.write_json(storage.join(champion_uri, "eval.json"), eval_doc)
    storage.write_json(storage.join(champion_uri, "model.json"), {"model": model_uri, "eval": eval_uri,
                                                                   "promoted_unix_s": time.time()})


def run(out: str, *, preset_name: str = "demo", nproc: int = 2, n: int = 2000, steps: int | None = None,
        champion: str | None = None) -> dict:
    """Run every stage into ``out`` and return a summary of each."""
    from m6.data.curate import curate
    from m6.data.synth import synthesize
    from m6.energy.monitor import EnergyMonitor
    from m6.energy.report import render
    from m6.eval.run import evaluate, summarize
    from m6.train.launch import train

    cfg = preset(preset_name)
    if steps is not None:
        cfg.train.steps = steps
    raw, data, run_dir, eval_dir = (storage.join(out, p) for p in ("raw", "curated", "train", "eval"))
    champion = champion or storage.join(out.rstrip("/").rsplit("/", 1)[0] if "/" in out.rstrip("/") else ".", "champion")
    # One run folder per invocation; stale stage outputs from an earlier run would otherwise be resumed.
    storage.delete_tree(out)

    # The pipeline-level monitor estimates each stage (its children's CPU time included);
    # training's own per-rank, per-step figures are in train/energy.json.
    monitor = EnergyMonitor(cfg.energy, run_id=f"local-{uuid.uuid4().hex[:8]}").start()
    summary: dict = {"out": out}
    t0 = time.perf_counter()

    _stage("1/4 synthesize the built-in corpus")
    with monitor.window("synthesize"):
        s = synthesize(raw, n=n, seed=0)
    _say(f"{s['items']} image-caption items + {s['text_docs']} documents ({s['dirty_items']} dirty) → {raw}")

    _stage("2/4 curate")
    with monitor.window("curate"):
        stats = curate([raw], data, cfg.data)
    top = sorted(((r, k) for r, k in stats["dropped"].items() if k), key=lambda x: -x[1])[:5]
    _say(f"read {stats['read']} → kept {stats['kept']} in {stats['shards']} shards; dropped {stats['dropped_total']} "
         f"({', '.join(f'{r} {k}' for r, k in top)}); split {stats['split']}\nreport: {storage.join(data, 'report.html')}")
    summary["curate"] = {k: stats[k] for k in ("read", "kept", "dropped_total", "shards", "split")}

    _stage(f"3/4 train the {preset_name} preset on {nproc} process(es)")
    with monitor.window("train"):
        ts = train(cfg, data, run_dir, nproc=nproc)
    first = ts.get("first_loss") or {}
    last = ts.get("last_loss_by_objective") or {}
    per_obj = ", ".join(f"{k} {first[k]:.3f}→{v:.3f}" if k in first else f"{k} {v:.3f}" for k, v in last.items())
    _say(f"{ts['steps']} steps in {ts['duration_s']:.0f}s; loss per objective (first→last): {per_obj}\n"
         f"{ts['mean_tokens_per_s']:.0f} tokens/s; checkpoint: {ts['checkpoint']}")
    summary["train"] = ts

    _stage("4/4 evaluate on the held-out split and gate")
    with monitor.window("evaluate"):
        doc = evaluate(run_dir, data, eval_dir, gate=True, champion_uri=champion)
    ev_summary, ev_text = summarize(doc, eval_dir)
    _say(ev_text)
    if doc["gate"]["decision"] == "promote":
        promote(doc, storage.join(eval_dir, "eval.json"), run_dir, champion)
        _say(f"promoted: {champion} now points at {run_dir}")
    summary["eval"] = ev_summary

    energy = monitor.stop()
    monitor.write(storage.join(out, "energy.json"))
    report = render(out)
    summary["energy"] = {"pipeline": energy["totals"], "stages": energy["stages"], "report": report}
    _stage("energy")
    _say(energy_text(energy, storage.read_json(storage.join(run_dir, "energy.json"))))
    _say(f"report: {report['report']} (plot {report['plot']})")
    _say(f"\nall stages done in {time.perf_counter() - t0:.0f}s; outputs under {out}")
    return summary


def energy_text(pipeline: dict, training: dict) -> str:
    """Joules by stage and source, measured or estimated, carbon and J/token, as a few lines."""
    t = pipeline["totals"]
    lines = [f"pipeline: {t['it_energy_j']:.0f} J IT ({t['facility_energy_j']:.0f} J facility at PUE "
             f"{pipeline['carbon']['pue']}), {t['carbon_g']:.2f} gCO2e at {pipeline['carbon']['gco2_per_kwh']:.0f} "
             f"g/kWh ({pipeline['carbon']['region']}); {100 * t['coverage_measured']:.0f}% measured"]
    for stage, st in pipeline["stages"].items():
        if stage == "unstaged" and st["energy_j"] < 0.5:
            continue
        kind = "estimated" if st["estimated_j"] >= st["measured_j"] else "measured"
        srcs = ", ".join(f"{s} {j:.0f} J" for s, j in st["by_source"].items())
        lines.append(f"  {stage:10s} {st['energy_j']:8.0f} J  {st['duration_s']:6.1f} s  {kind} ({srcs})")
    tt = training["totals"]
    jpt = tt.get("j_per_token")
    lines.append(f"training steps (the ranks' own meters, start-up excluded): {tt['it_energy_j']:.0f} J over {tt['tokens']} tokens"
                 + (f" = {jpt * 1e3:.3f} mJ/token" if jpt else "")
                 + f" ({'estimated' if tt['estimated'] else 'measured'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m m6.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/local", help="run folder (emptied first) or s3:// prefix")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--nproc", type=int, default=2, help="training processes")
    ap.add_argument("--n", type=int, default=2000, help="synthetic image-caption items")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    ap.add_argument("--champion", default=None, help="where the deployed model's eval.json lives (default: OUT/../champion)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from m6.config import ConfigError
    from m6.errors import UserError

    try:
        run(args.out, preset_name=args.preset, nproc=args.nproc, n=args.n, steps=args.steps, champion=args.champion)
    except (UserError, ConfigError, storage.StorageError, FileNotFoundError) as e:
        print(f"m6: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
