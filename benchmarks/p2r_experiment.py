"""Pseudo-to-Real vs the real model from scratch: validation loss against training FLOPs and wall time.

    .venv/bin/python benchmarks/p2r_experiment.py [--steps 160] [--delink 60]

Both arms train the demo preset (4 layers, MoE every second layer) on the demo corpus with 2 CPU
processes for the same number of steps, so the same tokens and training FLOPs (a shared layer
costs as much compute as a real one). The P2R arm trains the cross-layer-shared "pseudo" model
and delinks it at ``--delink`` inside the run (M6-10T, arXiv 2110.03888). Every checkpoint is
scored on the validation split (caption and text objectives, fixed batches and seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from _corpus import demo_dataset  # beside this script

REPO = Path(__file__).resolve().parents[1]


def val_batches(data: str, model_cfg, tok, n: int = 64, bs: int = 16) -> list[tuple[str, dict]]:
    """Fixed validation batches: caption batches from image samples, text batches from all samples."""
    from m6.config import preset
    from m6.train.data import BatchMaker, ShardStream

    stream = ShardStream(data, split="val", shuffle_buffer=1)
    bm = BatchMaker(stream, tok, model_cfg, preset("demo").train)
    samples, it = [], iter(stream)
    while len(samples) < n:
        samples.append(next(it)[1])
    images = [s for s in samples if "jpg" in s or "png" in s]
    out = []
    for i in range(0, len(images) - bs + 1, bs):
        chunk = images[i:i + bs]
        out.append(("caption", {"text": bm.encode_texts([s["txt"] for s in chunk]),
                                "image": torch.stack([bm.decode_image(s) for s in chunk])}))
    for i in range(0, len(samples) - bs + 1, bs):
        out.append(("text", {"text": bm.encode_texts([s["txt"] for s in samples[i:i + bs]])}))
    return out


@torch.no_grad()
def val_loss(ckpt: str, batches) -> float:
    from m6.train.checkpoint import load_model

    model, _, _, _ = load_model(ckpt)
    torch.manual_seed(0)  # span corruption draws from the global RNG: same noise for every checkpoint
    losses = [float(model(b, obj)["obj_loss"]) for obj, b in batches]
    return sum(losses) / len(losses)


def run_arm(name: str, data: str, out: str, steps: int, every: int, delink: int | None) -> list[dict]:
    from m6.config import preset
    from m6.model.params import count_params
    from m6.train.checkpoint import list_checkpoints
    from m6.train.launch import train

    cfg = preset("demo")
    cfg.model = dataclasses.replace(cfg.model, share_layers=delink is not None)
    # Micro-batch 16, lr 2e-3 and equal objective weights: the settings BENCHMARKS.md's figures were measured with.
    cfg.train = dataclasses.replace(cfg.train, steps=steps, save_every=every, log_every=every, keep_last=10**6,
                                    p2r_delink_step=delink, zero_stage=0, ep_size=2, warmup_steps=10,
                                    micro_batch_size=16, lr=2e-3,
                                    objective_weights={"text": 1.0, "caption": 1.0, "mm": 1.0, "contrastive": 1.0})
    cfg.energy = dataclasses.replace(cfg.energy, enabled=False)
    t0 = time.monotonic()
    train(cfg, data, out, nproc=2, log_sink=open(out + ".log", "w"))
    print(f"{name}: trained {steps} steps in {time.monotonic() - t0:.0f} s", flush=True)
    flops_per_token = count_params(dataclasses.replace(cfg.model, share_layers=False))["train_flops_per_token"]
    metrics = {r["step"]: r for r in map(json.loads, Path(out, "metrics.jsonl").read_text().splitlines())}
    tokens, rows = 0, []
    for step in sorted(metrics):
        tokens += metrics[step]["tokens"]
        metrics[step]["cum_tokens"] = tokens
    from m6.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(Path(out, "tokenizer.json")))
    batches = val_batches(data, dataclasses.replace(cfg.model, vocab_size=tok.get_vocab_size()), tok)
    for step, d, complete in list_checkpoints(str(Path(out, "checkpoints"))):
        if complete:
            m = metrics[step]
            rows.append({"arm": name, "step": step, "val_loss": val_loss(d, batches), "wall_s": m["elapsed_s"],
                         "train_flops": m["cum_tokens"] * flops_per_token})
            print(f"  {name} step {step}: val loss {rows[-1]['val_loss']:.4f}", flush=True)
    return rows


def plot(rows: list[dict], path: Path, delink: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm, style in (("pseudo-to-real", "o-"), ("real from scratch", "s--")):
        r = [x for x in rows if x["arm"] == arm]
        axes[0].plot([x["train_flops"] for x in r], [x["val_loss"] for x in r], style, label=arm)
        axes[1].plot([x["wall_s"] for x in r], [x["val_loss"] for x in r], style, label=arm)
    axes[0].set_xlabel("training FLOPs")
    axes[1].set_xlabel("wall time (s)")
    for ax in axes:
        ax.set_ylabel("validation loss (caption + text)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Pseudo-to-Real (delink at step {delink}) vs real model, demo preset, 2 CPU processes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--delink", type=int, default=60)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--data", help="curated dataset (default: the demo corpus made here)")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="m6-p2r-")
    data = a.data or demo_dataset(tmp, n=2000)
    rows = run_arm("pseudo-to-real", data, f"{tmp}/p2r", a.steps, a.every, a.delink)
    rows += run_arm("real from scratch", data, f"{tmp}/real", a.steps, a.every, None)
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    plot(rows, out / "p2r.png", a.delink)
    final = {arm: [x for x in rows if x["arm"] == arm][-1] for arm in ("pseudo-to-real", "real from scratch")}
    summary = {"rows": rows, "final": final, "steps": a.steps, "delink_step": a.delink}
    (out / "p2r.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(final, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
