"""Caption metrics BLEU-4 and CIDEr-D with the definitions of the COCO caption evaluation code.

Both follow ``pycocoevalcap`` (Chen et al., arXiv 1504.00325) exactly, so numbers
compare with published tables:

* BLEU-4 (Papineni et al. 2002) is corpus-level: clipped n-gram matches and
  candidate n-gram counts are summed over the corpus, the brevity penalty uses
  the reference length closest to each candidate, and the geometric mean keeps
  the reference code's 1e-15 / 1e-9 epsilons.
* CIDEr-D (Vedantam et al., arXiv 1411.5726): TF-IDF n-gram vectors (n = 1..4)
  with document frequencies from the evaluated references, clipped hypothesis
  weights, a Gaussian length penalty (σ = 6), averaged over references, × 10.

Tokenization replaces the reference's Java PTB tokenizer: lower-case, punctuation
removed, and every CJK character is its own token (character-level, as Chinese
caption benchmarks such as AIC-ICC and COCO-CN report).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

N_MAX = 4
CIDER_SIGMA = 6.0
_BLEU_TINY, _BLEU_SMALL = 1e-15, 1e-9

# CJK ideographs (+ extension A, compatibility) and CJK/full-width punctuation ranges.
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_CHAR = re.compile(f"([{_CJK}])")
_PUNCT = re.compile(r"[\u3000-\u303f\uff00-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation dropped; each CJK character is one token."""
    text = _PUNCT.sub(" ", text.lower())
    text = _CJK_CHAR.sub(r" \1 ", text)
    return text.split()


def _ngrams(tokens: Sequence[str], n_max: int = N_MAX) -> Counter:
    c: Counter = Counter()
    for n in range(1, n_max + 1):
        for i in range(len(tokens) - n + 1):
            c[tuple(tokens[i:i + n])] += 1
    return c


def _check_inputs(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference sets")
    for i, r in enumerate(refs):
        if not r:
            raise ValueError(f"item {i} has no reference caption")


def bleu(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]], n_max: int = N_MAX) -> dict:
    """Corpus BLEU-1..n over tokenized hypotheses and their reference sets.

    Args:
        hyps: one token list per item.
        refs: per item, one or more token lists.
        n_max: highest n-gram order.

    Returns:
        ``{"bleu": [BLEU-1, …, BLEU-n], "ratio": hyp_len / ref_len, "hyp_len", "ref_len"}``.
    """
    _check_inputs(hyps, refs)
    correct = [0] * n_max
    guess = [0] * n_max
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, refs):
        max_ref: Counter = Counter()
        for r in rs:
            max_ref |= _ngrams(r, n_max)  # element-wise max = clipping counts
        # closest reference length; on a tie the shorter one (the reference's min over (|diff|, len))
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in rs)[1]
        hyp_len += len(hyp)
        for gram, count in _ngrams(hyp, n_max).items():
            correct[len(gram) - 1] += min(count, max_ref.get(gram, 0))
        for n in range(1, n_max + 1):
            guess[n - 1] += max(0, len(hyp) - n + 1)
    scores, prod = [], 1.0
    for n in range(n_max):
        prod *= (correct[n] + _BLEU_TINY) / (guess[n] + _BLEU_SMALL)
        scores.append(prod ** (1.0 / (n + 1)))
    ratio = (hyp_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return {"bleu": scores, "ratio": ratio, "hyp_len": hyp_len, "ref_len": ref_len}


def _tfidf(counts: Counter, df: dict, log_n_docs: float) -> tuple[list[dict], list[float], int]:
    vec: list[dict] = [{} for _ in range(N_MAX)]
    norm = [0.0] * N_MAX
    for gram, tf in counts.items():
        n = len(gram) - 1
        w = tf * (log_n_docs - math.log(max(1.0, df.get(gram, 0.0))))
        vec[n][gram] = w
        norm[n] += w * w
    # The reference code measures length as the number of bigrams; the difference of two
    # lengths equals the word-count difference for every non-empty sentence.
    length = sum(c for g, c in counts.items() if len(g) == 2)
    return vec, [math.sqrt(x) for x in norm], length


def _cider_sim(h: tuple, r: tuple) -> list[float]:
    (vh, nh, lh), (vr, nr, lr) = h, r
    penalty = math.exp(-((lh - lr) ** 2) / (2 * CIDER_SIGMA ** 2))
    out = []
    for n in range(N_MAX):
        # CIDEr-D clips hypothesis weights at the reference's so repeating a word earns nothing
        val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
        if nh[n] != 0 and nr[n] != 0:
            val /= nh[n] * nr[n]
        out.append(val * penalty)
    return out


def cider_d(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]]) -> dict:
    """Corpus CIDEr-D and the per-item scores.

    Returns:
        ``{"cider_d": mean, "per_item": [...]}``.
    """
    _check_inputs(hyps, refs)
    ref_counts = [[_ngrams(r) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rcs in ref_counts:
        df.update(set().union(*[set(c) for c in rcs]))
    log_n = math.log(float(len(refs))) if refs else 0.0
    per_item = []
    for hyp, rcs in zip(hyps, ref_counts):
        h = _tfidf(_ngrams(hyp), df, log_n)
        total = [0.0] * N_MAX
        for rc in rcs:
            total = [a + b for a, b in zip(total, _cider_sim(h, _tfidf(rc, df, log_n)))]
        per_item.append(sum(total) / N_MAX / len(rcs) * 10.0)
    return {"cider_d": sum(per_item) / len(per_item) if per_item else float("nan"), "per_item": per_item}


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """BLEU-4 and CIDEr-D of raw caption strings (tokenized with :func:`tokenize`).

    Args:
        predictions: one generated caption per image.
        references: per image, its reference captions.

    Returns:
        ``{"bleu4", "bleu": [1..4], "cider_d", "per_item_cider_d", "images", "references"}``.
    """
    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(r) for r in rs] for rs in references]
    b = bleu(hyps, refs)
    c = cider_d(hyps, refs)
    return {"bleu4": b["bleu"][3], "bleu": b["bleu"], "cider_d": c["cider_d"], "per_item_cider_d": c["per_item"],
            "images": len(hyps), "references": sum(len(r) for r in refs)}
