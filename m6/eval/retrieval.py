"""Cross-modal retrieval metrics: Recall@K with exact tie handling, COCO/Flickr mean recall and MUGE MR.

Protocol (Flickr30K / MS-COCO 5k, Karpathy et al. 2015; MUGE, Chinese-CLIP arXiv 2211.01335):

* a query is a hit at K when *any* of its relevant candidates ranks in the top K;
* text→image: every distinct text is a query over all images (a MUGE query may
  match several product images); image→text: every image that has at least one
  caption is a query over all texts (five captions per COCO image);
* ``mean_recall`` averages R@1/5/10 of both directions (the Flickr/COCO "RSUM/6");
  ``muge_mr`` averages text→image R@1/5/10, the MR column of the MUGE leaderboard.

Ties are where naive ``argsort`` implementations flatter a model: a model that
outputs a constant score would get R@1 = 1 if ties broke in the ground truth's
favour. Here ``ties="expected"`` (the default) gives the exact expectation under a
uniformly random tie break, so a constant model scores exactly chance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
TIE_MODES = ("expected", "pessimistic", "optimistic")


def _miss_prob(incorrect_tied: int, correct_tied: int, slots: int) -> float:
    """P(the first ``slots`` places of a random order of a tie group are all incorrect).

    The group holds ``correct_tied`` relevant and ``incorrect_tied`` irrelevant
    candidates; the product is C(t, s) / C(t + c, s) written without overflow.
    """
    if slots > incorrect_tied:
        return 0.0
    p = 1.0
    for i in range(slots):
        p *= (incorrect_tied - i) / (incorrect_tied + correct_tied - i)
    return p


def query_recall(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int], ties: str = "expected") -> np.ndarray:
    """Recall@K of one query for each K (1.0 hit, 0.0 miss, a fraction under ``expected`` ties).

    Args:
        scores: ``[C]`` similarity of the query to every candidate (higher = closer).
        relevant: ``[C]`` bool, the ground-truth candidates (at least one).
        ks: cut-offs.
        ties: ``expected`` (exact expectation over random tie breaks),
            ``pessimistic`` (ties rank irrelevant candidates first) or ``optimistic``.

    Returns:
        ``[len(ks)]`` float array.
    """
    if ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
    if not relevant.any():
        raise ValueError("query has no relevant candidate")
    best = scores[relevant].max()
    above = int(np.count_nonzero(scores[~relevant] > best))
    tied_wrong = int(np.count_nonzero(scores[~relevant] == best))
    tied_right = int(np.count_nonzero(scores[relevant] == best))
    out = np.empty(len(ks))
    for j, k in enumerate(ks):
        slots = k - above  # places left in the top K once strictly better candidates are placed
        if slots <= 0:
            out[j] = 0.0
        elif ties == "optimistic":
            out[j] = 1.0
        elif ties == "pessimistic":
            out[j] = 1.0 if tied_wrong < slots else 0.0
        else:
            out[j] = 1.0 - _miss_prob(tied_wrong, tied_right, slots)
    return out


def recall_at_k(sim: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                ties: str = "expected") -> dict:
    """Recall@K over all queries (rows of ``sim``) that have at least one relevant candidate.

    Args:
        sim: ``[Q, C]`` query × candidate similarities.
        relevant: ``[Q, C]`` bool ground truth.
        ks: cut-offs (clipped to the number of candidates).
        ties: see :func:`query_recall`.

    Returns:
        ``{"R@k": value, …, "queries": n, "queries_without_relevant": m, "per_query": [Q', len(ks)]}``.
    """
    sim = np.asarray(sim)
    if not np.issubdtype(sim.dtype, np.floating):
        sim = sim.astype(np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if sim.shape != relevant.shape or sim.ndim != 2:
        raise ValueError(f"sim {sim.shape} and relevant {relevant.shape} must be the same 2-D shape")
    if not np.isfinite(sim).all():
        bad = np.argwhere(~np.isfinite(sim))[0]
        raise ValueError(f"non-finite similarity at query {bad[0]}, candidate {bad[1]}")
    has = relevant.any(axis=1)
    rows = [query_recall(sim[q], relevant[q], ks, ties) for q in np.flatnonzero(has)]
    per_query = np.stack(rows) if rows else np.zeros((0, len(ks)))
    out: dict = {f"R@{k}": float(per_query[:, j].mean()) if rows else float("nan") for j, k in enumerate(ks)}
    out["queries"] = int(has.sum())
    out["queries_without_relevant"] = int((~has).sum())
    out["per_query"] = per_query
    return out


def chance_recall(relevant: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Expected Recall@K of a model that ranks candidates uniformly at random.

    For a query with ``r`` relevant among ``C`` candidates the miss probability is
    C(C-r, K) / C(C, K); this is the floor a random model sits on, and what the
    report prints next to every recall so small eval sets are read honestly.
    """
    relevant = np.asarray(relevant, dtype=bool)
    n_cand = relevant.shape[1]
    r = relevant.sum(axis=1)
    r = r[r > 0]
    out = {}
    for k in ks:
        vals = [1.0 - _miss_prob(n_cand - int(ri), int(ri), min(k, n_cand)) for ri in r]
        out[f"R@{k}"] = float(np.mean(vals)) if vals else float("nan")
    return out


def recall_curve(sim: np.ndarray, relevant: np.ndarray, max_k: int | None = None, ties: str = "expected") -> list[float]:
    """Recall@K for K = 1..max_k (the report's recall@k curve)."""
    n_cand = np.asarray(sim).shape[1]
    max_k = min(max_k or n_cand, n_cand)
    r = recall_at_k(sim, relevant, ks=list(range(1, max_k + 1)), ties=ties)
    return [r[f"R@{k}"] for k in range(1, max_k + 1)]


def retrieval_metrics(text_emb: np.ndarray, image_emb: np.ndarray, text_image: np.ndarray,
                      ks: Sequence[int] = DEFAULT_KS, ties: str = "expected") -> dict:
    """Both retrieval directions from embeddings and a text × image relevance matrix.

    Args:
        text_emb: ``[N_t, D]`` L2-normalised text embeddings (one per distinct text).
        image_emb: ``[N_i, D]`` L2-normalised image embeddings (one per distinct image).
        text_image: ``[N_t, N_i]`` bool, text t describes image i.
        ks: cut-offs.
        ties: see :func:`query_recall`.

    Returns:
        ``{"t2i": {...}, "i2t": {...}, "mean_recall", "muge_mr", "chance": {...},
        "mean_recall_lift", "sim": [N_t, N_i]}``; ``mean_recall_lift`` is mean recall
        over its chance value (1.0 = no better than random ranking).
    """
    text_image = np.asarray(text_image, dtype=bool)
    # float32 like the embeddings: a 25k-caption × 5k-image COCO matrix stays at 0.5 GB
    sim = np.asarray(text_emb, dtype=np.float32) @ np.asarray(image_emb, dtype=np.float32).T
    t2i = recall_at_k(sim, text_image, ks, ties)
    i2t = recall_at_k(sim.T, text_image.T, ks, ties)
    chance_t2i, chance_i2t = chance_recall(text_image, ks), chance_recall(text_image.T, ks)
    keys = [f"R@{k}" for k in ks]
    mean_recall = float(np.mean([t2i[k] for k in keys] + [i2t[k] for k in keys]))
    chance_mean = float(np.mean([chance_t2i[k] for k in keys] + [chance_i2t[k] for k in keys]))
    return {
        "t2i": t2i, "i2t": i2t,
        "mean_recall": mean_recall,
        "muge_mr": float(np.mean([t2i[k] for k in keys])),
        "chance": {"t2i": chance_t2i, "i2t": chance_i2t, "mean_recall": chance_mean},
        "mean_recall_lift": mean_recall / chance_mean if chance_mean > 0 and not math.isnan(mean_recall) else float("nan"),
        "sim": sim,
    }
