"""Recall@K against hand-computed cases, exhaustive tie breaks, and the VSE++ reference ranking code."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from m6.eval.retrieval import chance_recall, query_recall, recall_at_k, recall_curve, retrieval_metrics


def test_clear_ranking_gives_hand_computed_recalls():
    # query 0: relevant candidate ranked 1st; query 1: 3rd; query 2: 2nd
    sim = np.array([[0.9, 0.1, 0.2, 0.0],
                    [0.8, 0.7, 0.1, 0.0],
                    [0.3, 0.1, 0.2, 0.5]])
    rel = np.zeros_like(sim, dtype=bool)
    rel[0, 0] = rel[1, 2] = rel[2, 0] = True
    r = recall_at_k(sim, rel, ks=(1, 2, 3))
    assert r["R@1"] == pytest.approx(1 / 3)
    assert r["R@2"] == pytest.approx(2 / 3)
    assert r["R@3"] == pytest.approx(1.0)
    assert r["queries"] == 3


def test_ties_expected_pessimistic_optimistic():
    scores = np.zeros(4)
    one = np.array([False, True, False, False])
    assert query_recall(scores, one, (1, 2, 4)).tolist() == pytest.approx([0.25, 0.5, 1.0])
    assert query_recall(scores, one, (1, 2, 4), ties="pessimistic").tolist() == [0.0, 0.0, 1.0]
    assert query_recall(scores, one, (1, 2, 4), ties="optimistic").tolist() == [1.0, 1.0, 1.0]
    two = np.array([True, True, False, False])
    # P(hit@1) = 2/4; P(miss@2) = 2/4 * 1/3
    assert query_recall(scores, two, (1, 2)).tolist() == pytest.approx([0.5, 5 / 6])


def test_expected_ties_equal_the_average_over_every_tie_break():
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.2, 0.5])
    relevant = np.array([True, False, False, True, False, False])
    ks = (1, 2, 3, 4, 5)
    tied = np.flatnonzero(scores == 0.5)
    hits = np.zeros(len(ks))
    perms = list(itertools.permutations(tied))
    for perm in perms:
        # break ties by adding a tiny, permutation-ordered offset
        s = scores.copy()
        for rank, idx in enumerate(perm):
            s[idx] += 1e-6 * (len(perm) - rank)
        hits += query_recall(s, relevant, ks, ties="pessimistic")
    assert query_recall(scores, relevant, ks).tolist() == pytest.approx((hits / len(perms)).tolist())


def test_constant_scores_sit_exactly_at_chance():
    rng = np.random.default_rng(0)
    rel = rng.random((7, 12)) < 0.2
    rel[np.arange(7), rng.integers(0, 12, 7)] = True
    r = recall_at_k(np.zeros(rel.shape), rel, ks=(1, 5, 10))
    chance = chance_recall(rel, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert r[f"R@{k}"] == pytest.approx(chance[f"R@{k}"])


def _vsepp_i2t(sims: np.ndarray, caps_per_image: int) -> tuple[float, float, float]:
    """The image→text ranking of VSE++ (Faghri et al.), as Flickr/COCO papers compute it."""
    n_img = sims.shape[0]
    ranks = np.zeros(n_img)
    for i in range(n_img):
        inds = np.argsort(sims[i])[::-1]
        rank = 1e20
        for j in range(caps_per_image * i, caps_per_image * (i + 1)):
            rank = min(rank, np.where(inds == j)[0][0])
        ranks[i] = rank
    return tuple(float(np.mean(ranks < k)) for k in (1, 5, 10))


def _vsepp_t2i(sims: np.ndarray, caps_per_image: int) -> tuple[float, float, float]:
    ranks = np.zeros(sims.shape[1])
    for t in range(sims.shape[1]):
        inds = np.argsort(sims[:, t])[::-1]
        ranks[t] = np.where(inds == t // caps_per_image)[0][0]
    return tuple(float(np.mean(ranks < k)) for k in (1, 5, 10))


def test_five_captions_per_image_match_the_vsepp_protocol():
    rng = np.random.default_rng(1)
    n_img, cpi, d = 30, 5, 16
    img = rng.normal(size=(n_img, d))
    txt = np.repeat(img, cpi, axis=0) + 1.5 * rng.normal(size=(n_img * cpi, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    rel = np.zeros((n_img * cpi, n_img), dtype=bool)
    rel[np.arange(n_img * cpi), np.arange(n_img * cpi) // cpi] = True
    m = retrieval_metrics(txt, img, rel)
    assert (m["i2t"]["R@1"], m["i2t"]["R@5"], m["i2t"]["R@10"]) == pytest.approx(_vsepp_i2t(img @ txt.T, cpi))
    assert (m["t2i"]["R@1"], m["t2i"]["R@5"], m["t2i"]["R@10"]) == pytest.approx(_vsepp_t2i(img @ txt.T, cpi))
    assert m["i2t"]["queries"] == n_img and m["t2i"]["queries"] == n_img * cpi
    six = [m[d][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]
    assert m["mean_recall"] == pytest.approx(np.mean(six))
    assert m["muge_mr"] == pytest.approx(np.mean(six[:3]))
    assert m["mean_recall_lift"] > 2  # correlated embeddings are far above chance


def test_muge_query_with_several_matching_images_and_unmatched_images():
    # 2 queries over 5 images; query 0 matches images 0,1; query 1 matches 3; image 2 and 4 match nothing
    rel = np.zeros((2, 5), dtype=bool)
    rel[0, [0, 1]] = True
    rel[1, 3] = True
    sim = np.array([[0.1, 0.8, 0.9, 0.0, 0.2],
                    [0.5, 0.4, 0.3, 0.2, 0.1]])
    t2i = recall_at_k(sim, rel, ks=(1, 2, 5))
    # query 0: best relevant (0.8) is 2nd; query 1: relevant (0.2) is 4th
    assert t2i["R@1"] == 0.0 and t2i["R@2"] == 0.5 and t2i["R@5"] == 1.0
    i2t = recall_at_k(sim.T, rel.T, ks=(1,))
    assert i2t["queries"] == 3 and i2t["queries_without_relevant"] == 2


def test_recall_curve_is_monotone_and_reaches_one():
    rng = np.random.default_rng(2)
    rel = np.eye(8, dtype=bool)
    curve = recall_curve(rng.normal(size=(8, 8)), rel)
    assert len(curve) == 8 and curve[-1] == 1.0
    assert all(a <= b for a, b in zip(curve, curve[1:]))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same 2-D shape"):
        recall_at_k(np.zeros((2, 3)), np.zeros((3, 2), dtype=bool))
    sim = np.zeros((2, 2))
    sim[1, 0] = np.nan
    with pytest.raises(ValueError, match="query 1, candidate 0"):
        recall_at_k(sim, np.eye(2, dtype=bool))
    with pytest.raises(ValueError, match="ties must be"):
        query_recall(np.zeros(2), np.array([True, False]), (1,), ties="best")
