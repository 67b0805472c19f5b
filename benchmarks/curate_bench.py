"""Curation throughput versus the bare PIL decode → resize → encode floor, and 1 → 2 worker scaling.

Run: ``python benchmarks/curate_bench.py [--n 400] [--reps 3] [--side 512] [--json OUT]``

The corpus is photo-like JPEGs (smooth colour fields plus sensor-like noise, so libjpeg
does real work) in a captions.jsonl folder. Each repetition runs, interleaved, (a) the
floor: read → ``Image.open`` → full decode → resize shorter side → JPEG encode, nothing
else; (b) ``curate()`` with one process; (c) ``curate()`` with two worker processes.
Curation includes every filter, exact and near-duplicate detection, shard writing,
tokenizer training and the report. Medians over repetitions are reported.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m6.config import DataConfig  # noqa: E402
from m6.data.curate import curate  # noqa: E402


def make_corpus(root: Path, n: int, side: int, seed: int = 0) -> None:
    """``n`` photo-like JPEGs of about ``side`` px with English/Chinese captions."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        w, h = side + int(rng.integers(-side // 8, side // 8)), side + int(rng.integers(-side // 8, side // 8))
        base = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.int16)
        noise = rng.normal(0, 10, size=(h, w, 3))
        img = Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))
        img.save(root / "images" / f"{i:06d}.jpg", quality=90)
        cap = f"a photo of product {i} in colour {int(base[0, 0, 0])}" if i % 2 else f"商品 {i} 号，颜色 {int(base[0, 0, 1])}"
        lines.append(json.dumps({"image": f"images/{i:06d}.jpg", "caption": cap}, ensure_ascii=False))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def floor_loop(root: Path, size: int, quality: int) -> int:
    """The bare floor: decode, resize the shorter side to ``size``, encode. Returns images done."""
    from PIL import Image

    n = 0
    for line in (root / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        data = (root / rec["image"]).read_bytes()
        im = Image.open(io.BytesIO(data)).convert("RGB")
        s = size / min(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="images in the corpus")
    ap.add_argument("--side", type=int, default=512, help="approximate source image side in px")
    ap.add_argument("--size", type=int, default=64, help="curated shorter side in px")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", default=None, help="write a bar chart PNG here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="m6-bench-") as tmp:
        root = Path(tmp) / "corpus"
        t = time.perf_counter()
        make_corpus(root, args.n, args.side)
        print(f"corpus: {args.n} JPEGs of ~{args.side}px in {time.perf_counter() - t:.1f}s", flush=True)
        rates: dict[str, list[float]] = {"floor": [], "curate_1proc": [], "curate_2proc": [], "worker_stage_1proc": []}
        floor_loop(root, args.size, 90)  # warm the page cache and PIL's plugins before timing
        for rep in range(args.reps):
            t = time.perf_counter()
            n = floor_loop(root, args.size, 90)
            rates["floor"].append(n / (time.perf_counter() - t))
            for workers in (1, 2):
                cfg = DataConfig(image_size=args.size, workers=workers, tokenizer_vocab_size=400)
                out = Path(tmp) / f"out-{rep}-{workers}"
                t = time.perf_counter()
                st = curate([str(root)], str(out), cfg)
                rates[f"curate_{workers}proc"].append(st["read"] / (time.perf_counter() - t))
                if workers == 1:
                    rates["worker_stage_1proc"].append(st["read"] / st["worker_stage_s"])
                assert st["kept"] + st["dropped_total"] == st["read"] == args.n
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "n": args.n, "side_px": args.side, "size_px": args.size, "reps": args.reps,
        "median_samples_per_s": {k: round(v, 1) for k, v in med.items()},
        "curate_1proc_vs_floor": round(med["curate_1proc"] / med["floor"], 3),
        "worker_stage_vs_floor": round(med["worker_stage_1proc"] / med["floor"], 3),
        "scaling_2proc_vs_1proc": round(med["curate_2proc"] / med["curate_1proc"], 3),
        # Ratios within each repetition: the floor and curation ran back to back under the same machine load.
        "paired_curate_1proc_vs_floor": round(statistics.median(
            c / f for c, f in zip(rates["curate_1proc"], rates["floor"])), 3),
        "paired_scaling_2proc_vs_1proc": round(statistics.median(
            b / a for a, b in zip(rates["curate_1proc"], rates["curate_2proc"])), 3),
        "all_samples_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(med), list(med.values()), color=["#888", "#4a7ab5", "#2d5a8a", "#9bb8dd"])
        ax.set_ylabel("samples/s (median)")
        ax.set_title(f"curation vs decode-resize-encode floor ({args.n} × ~{args.side}px JPEG)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=90)
    return 0


if __name__ == "__main__":
    sys.exit(main())
