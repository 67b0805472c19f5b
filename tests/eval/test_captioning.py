"""BLEU-4 and CIDEr-D against hand-computed values and the reference pycocoevalcap scorers."""

from __future__ import annotations

import math

import pytest

from m6.eval.captioning import bleu, caption_metrics, cider_d, tokenize

PAIRS = [  # (candidate, references): English and Chinese, several references, a repeated word, an empty candidate
    ("a man riding a wave on a surfboard", ["a man riding a wave on top of a surfboard", "a surfer rides a large wave",
                                            "man on a surfboard in the ocean"]),
    ("two dogs playing in the grass", ["two dogs play on the green grass", "a pair of dogs in a field"]),
    ("a a a a a", ["a cat sitting on a couch", "a cat on the sofa"]),
    ("", ["a red bus on the street"]),
    ("一只黄色的小狗趴在长椅上", ["一只黄色的小狗趴在长椅上", "长椅上有一只狗"]),
    ("机场的飞机准备起飞", ["机场跑道的喷气式飞机正准备起飞。", "一架飞机停在机场"]),
    ("圣诞 抱枕", ["圣诞 抱枕", "圣诞节 抱枕 靠垫"]),
]


def test_tokenize_is_character_level_for_chinese_and_drops_punctuation():
    assert tokenize("机场跑道的飞机。") == ["机", "场", "跑", "道", "的", "飞", "机"]
    assert tokenize("A Dog, running!") == ["a", "dog", "running"]
    assert tokenize("32不粘锅 pan") == ["32", "不", "粘", "锅", "pan"]


def test_bleu4_hand_computed():
    # correct n-grams 5/6, 3/5, 2/4, 1/3, equal lengths so no brevity penalty
    b = bleu([tokenize("the cat sat on the mat")], [[tokenize("the cat sat on a mat")]])
    assert b["bleu"][3] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-6)
    # a shorter candidate pays exp(1 - r/c)
    short = bleu([tokenize("the cat sat on")], [[tokenize("the cat sat on a mat")]])
    assert short["bleu"][3] == pytest.approx(math.exp(1 - 6 / 4), rel=1e-6)


def test_cider_d_hand_computed():
    # two images: idf of every n-gram is log(2); image B's candidate is one word shorter
    refs = [[["a", "b"]], [["c", "d"]]]
    c = cider_d([["a", "b"], ["c"]], refs)
    a_score = (1 + 1) / 4 * 10  # unigram and bigram cosines are 1; no 3-, 4-grams
    b_score = (1 / math.sqrt(2)) * math.exp(-1 / (2 * 36)) / 4 * 10
    assert c["per_item"] == pytest.approx([a_score, b_score])
    assert c["cider_d"] == pytest.approx((a_score + b_score) / 2)


def test_cider_d_clips_repeated_words():
    refs = [[["a", "cat"]], [["a", "dog"]], [["the", "bird"]]]
    once = cider_d([["cat"], ["x"], ["y"]], refs)["per_item"][0]
    many = cider_d([["cat", "cat", "cat"], ["x"], ["y"]], refs)["per_item"][0]
    assert many < once


def _reference(pairs):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {i: [" ".join(tokenize(c))] for i, (c, _) in enumerate(pairs)}
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, (_, refs) in enumerate(pairs)}
    bleu_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider_score, cider_items = Cider().compute_score(gts, res)
    return bleu_scores, cider_score, cider_items


def test_matches_pycocoevalcap_on_a_fixed_set():
    ref_bleu, ref_cider, ref_items = _reference(PAIRS)
    ours = caption_metrics([c for c, _ in PAIRS], [r for _, r in PAIRS])
    assert ours["bleu"] == pytest.approx(ref_bleu, rel=1e-9, abs=1e-12)
    assert ours["bleu4"] == pytest.approx(ref_bleu[3], rel=1e-9)
    assert ours["cider_d"] == pytest.approx(ref_cider, rel=1e-9)
    assert ours["per_item_cider_d"] == pytest.approx(list(ref_items), rel=1e-9, abs=1e-12)
    assert ours["images"] == len(PAIRS) and ours["references"] == sum(len(r) for _, r in PAIRS)


def test_matches_pycocoevalcap_on_chinese_subset():
    zh = PAIRS[4:]
    ref_bleu, ref_cider, _ = _reference(zh)
    ours = caption_metrics([c for c, _ in zh], [r for _, r in zh])
    assert ours["bleu4"] == pytest.approx(ref_bleu[3], rel=1e-9)
    assert ours["cider_d"] == pytest.approx(ref_cider, rel=1e-9)


def test_missing_references_are_reported_with_the_item():
    with pytest.raises(ValueError, match="item 1 has no reference"):
        caption_metrics(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        caption_metrics(["a", "b"], [["a"]])
