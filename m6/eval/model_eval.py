"""Running an M6Model over an eval set: batched embeddings, generated captions, per-objective perplexity."""

from __future__ import annotations

import logging
import math

import numpy as np

from m6.eval.data import EvalSet, decode_ids, image_tensor, text_tensor
from m6.eval.moe_health import MoEHealth

log = logging.getLogger(__name__)


def _batches(n: int, size: int, desc: str):
    from tqdm import tqdm

    starts = range(0, n, size)
    return tqdm(starts, desc=desc, total=len(starts), unit="batch", leave=False, mininterval=2.0)


def embed(model, mcfg, es: EvalSet, tokenizer, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(text_emb [N_t, D], image_emb [N_i, D])`` of the eval set's distinct texts and images, in batches."""
    import torch

    cfg = mcfg
    texts, images = [], []
    with torch.no_grad():
        for s in _batches(len(es.texts), batch_size, "embed text"):
            t = text_tensor(es.texts[s:s + batch_size], tokenizer, cfg.max_text_len)
            texts.append(model.embed_text(t).float().cpu().numpy())
        for s in _batches(len(es.images), batch_size, "embed images"):
            x = image_tensor(es.images[s:s + batch_size], cfg.image_size)
            images.append(model.embed_image(x).float().cpu().numpy())
    d = cfg.contrastive_dim
    return (np.concatenate(texts) if texts else np.zeros((0, d)), np.concatenate(images) if images else np.zeros((0, d)))


def captions(model, mcfg, es: EvalSet, tokenizer, batch_size: int, max_new_tokens: int, method: str) -> list[str]:
    """One generated caption per distinct image."""
    import torch

    out: list[str] = []
    with torch.no_grad():
        for s in _batches(len(es.images), batch_size, "caption"):
            x = image_tensor(es.images[s:s + batch_size], mcfg.image_size)
            ids = model.generate(image=x, max_new_tokens=max_new_tokens, method=method)
            out.extend(decode_ids(tokenizer, seq) for seq in ids)
    return out


def _objective_nll(model, batches, objective: str, health: MoEHealth) -> dict:
    nll, tokens, n = 0.0, 0, 0
    for batch, size in batches:
        r = model(batch, objective)
        t = int(r["tokens"])
        nll += float(r["obj_loss"]) * t  # obj_loss is the mean over the t target tokens
        tokens += t
        n += size
        stats = model.moe_stats()
        if stats:
            health.add(stats)
    mean = nll / tokens if tokens else float("nan")
    return {"nll": mean, "perplexity": math.exp(mean) if tokens and mean < 700 else float("nan"),
            "tokens": tokens, "samples": n}


def perplexity(model, mcfg, es: EvalSet, tokenizer, batch_size: int, seed: int) -> tuple[dict, MoEHealth]:
    """Per-objective held-out perplexity, exp(token-weighted mean NLL), and the MoE health seen meanwhile.

    ``text``: span denoising on text-only documents; ``caption``: image → its first
    reference; ``mm``: image + caption prefix → rest (M6, arXiv 2103.00823 §3.2).
    The model's own randomness (span corruption, split points) comes from torch's
    global RNG, seeded here so two evaluations of one checkpoint agree exactly.
    """
    import torch

    cfg = mcfg
    health = MoEHealth()
    out: dict[str, dict] = {}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            if es.docs:
                docs = ((({"text": text_tensor(es.docs[s:s + batch_size], tokenizer, cfg.max_text_len)}),
                         len(es.docs[s:s + batch_size])) for s in _batches(len(es.docs), batch_size, "ppl text"))
                out["text"] = _objective_nll(model, docs, "text", health)
            captioned = [i for i, refs in enumerate(es.references) if refs]
            if captioned:
                imgs = [es.images[i] for i in captioned]
                first = [es.references[i][0] for i in captioned]
                for objective in ("caption", "mm"):
                    pairs = (({"image": image_tensor(imgs[s:s + batch_size], cfg.image_size),
                               "text": text_tensor(first[s:s + batch_size], tokenizer, cfg.max_text_len)},
                              len(first[s:s + batch_size]))
                             for s in _batches(len(first), batch_size, f"ppl {objective}"))
                    out[objective] = _objective_nll(model, pairs, objective, health)
    finally:
        torch.random.set_rng_state(state)
    return out, health
