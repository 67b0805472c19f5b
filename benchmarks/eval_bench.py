"""Evaluation speed against baselines measured in the same run: batched embedding, caption metrics, Recall@K.

    .venv/bin/python benchmarks/eval_bench.py [--reps 5] [--n-images 256] [--n-captions 2000]

Each comparison interleaves the two implementations for ``--reps`` repetitions and
reports medians and their ratio:

* embedding the eval set in batches (what ``m6 eval`` does) vs one sample at a time;
* our BLEU-4 + CIDEr-D vs pycocoevalcap's reference scorers on the same captions
  (the scores are also compared; they must agree);
* our Recall@K with exact tie handling vs the VSE++ argsort loop (no tie handling).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import time

import numpy as np


def _timeit(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleave(a, b, reps: int) -> dict:
    ta, tb = [], []
    for _ in range(reps):
        ta.append(_timeit(a))
        tb.append(_timeit(b))
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"ours_s": ma, "baseline_s": mb, "speedup": mb / ma}


def bench_embedding(n_images: int, reps: int) -> dict:
    import torch

    from m6.config import preset
    from m6.data import synth
    from m6.data.tokenizer import train_tokenizer
    from m6.eval.data import EvalSet, image_tensor
    from m6.eval.model_eval import embed
    from m6.model.m6 import M6Model

    rng = random.Random(0)
    es = EvalSet(split="test")
    by_hash: dict = {}
    for i in range(n_images):
        a = {"kind": rng.randrange(8), "color": rng.randrange(8), "pattern": rng.randrange(4), "size": rng.randrange(2),
             "position": rng.randrange(5), "background": rng.randrange(4)}
        buf = io.BytesIO()
        synth.render(a, rng, size=(64, 64)).save(buf, format="JPEG")
        es.add_pair(f"k{i}", buf.getvalue(), synth.captions_for(a, "en", rng, n=1), by_hash)
    es.finish()
    tok = train_tokenizer([t for refs in es.references for t in refs], vocab_size=400)
    cfg = preset("tiny").model
    cfg.vocab_size = tok.get_vocab_size()
    torch.manual_seed(0)
    model = M6Model(cfg).eval()
    image_tensor(es.images[:2], cfg.image_size)  # warm PIL codecs
    r = interleave(lambda: embed(model, cfg, es, tok, 32), lambda: embed(model, cfg, es, tok, 1), reps)
    r.update(images=len(es.images), texts=len(es.texts), batch=32,
             items_per_s=(len(es.images) + len(es.texts)) / r["ours_s"])
    return r


def bench_captions(n: int, reps: int) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from m6.data import synth
    from m6.eval.captioning import bleu, cider_d, tokenize

    rng = random.Random(1)
    hyps, refs = [], []
    for _ in range(n):
        a = {"kind": rng.randrange(8), "color": rng.randrange(8), "pattern": rng.randrange(4), "size": rng.randrange(2),
             "position": rng.randrange(5), "background": rng.randrange(4)}
        caps = synth.captions_for(a, rng.choice(("en", "zh")), rng, n=4)
        hyps.append(tokenize(caps[0]))
        refs.append([tokenize(c) for c in caps[1:]])
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    out: dict = {}

    def ours():
        out["ours"] = (bleu(hyps, refs)["bleu"][3], cider_d(hyps, refs)["cider_d"])

    def reference():
        out["ref"] = (Bleu(4).compute_score(gts, res, verbose=0)[0][3], Cider().compute_score(gts, res)[0])

    r = interleave(ours, reference, reps)
    r.update(captions=n, references_per_caption=3, ours_bleu4_cider=out["ours"], reference_bleu4_cider=out["ref"],
             max_abs_diff=max(abs(a - b) for a, b in zip(out["ours"], out["ref"])))
    return r


def _vsepp_t2i(sims_TI: np.ndarray, gt_T: np.ndarray) -> float:
    ranks = np.empty(len(gt_T))
    for t in range(len(gt_T)):
        inds = np.argsort(sims_TI[t])[::-1]
        ranks[t] = np.where(inds == gt_T[t])[0][0]
    return float(np.mean(ranks < 1))


def bench_recall(n_images: int, reps: int) -> dict:
    from m6.eval.retrieval import recall_at_k

    rng = np.random.default_rng(0)
    n_text = 5 * n_images
    sim = rng.normal(size=(n_text, n_images))
    gt = np.arange(n_text) // 5
    rel = np.zeros_like(sim, dtype=bool)
    rel[np.arange(n_text), gt] = True
    out: dict = {}
    r = interleave(lambda: out.__setitem__("ours", recall_at_k(sim, rel, (1,))["R@1"]),
                   lambda: out.__setitem__("ref", _vsepp_t2i(sim, gt)), reps)
    r.update(queries=n_text, candidates=n_images, ours_r1=out["ours"], vsepp_r1=out["ref"])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--n-captions", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results = {}
    for name, fn in (("embedding", lambda: bench_embedding(args.n_images, args.reps)),
                     ("caption_metrics", lambda: bench_captions(args.n_captions, args.reps)),
                     ("recall", lambda: bench_recall(1000, args.reps))):
        t = time.perf_counter()
        results[name] = fn()
        print(f"{name}: {json.dumps(results[name], default=float)}  ({time.perf_counter() - t:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
