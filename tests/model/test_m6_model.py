"""M6Model behaviour: objectives, prefix-LM mask, padding, delinking, KV-cache generation, overfitting."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from m6.config import BOS_ID, EOS_ID, PAD_ID, preset
from m6.model.generate import Decoder, _nucleus
from m6.model.m6 import OBJECTIVES, M6Model, prefix_lm_mask, span_corrupt, split_prefix


def tiny_cfg(**kw):
    return dataclasses.replace(preset("tiny").model, **kw)


def make_batch(B=3, T=10, seed=0, cfg=None):
    cfg = cfg or tiny_cfg()
    g = torch.Generator().manual_seed(seed)
    text = torch.full((B, T), PAD_ID, dtype=torch.int64)
    for i in range(B):
        n = int(torch.randint(3, T - 1, (1,), generator=g))
        text[i, 0] = BOS_ID
        text[i, 1:n + 1] = torch.randint(5, cfg.vocab_size, (n,), generator=g)
        text[i, n + 1] = EOS_ID
    image = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    return {"text": text, "image": image}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_returns_the_contract_and_backpropagates(objective):
    torch.manual_seed(0)
    model = M6Model(tiny_cfg())
    out = model(make_batch(), objective)
    assert set(out) >= {"loss", "obj_loss", "aux_loss", "tokens"}
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    assert isinstance(out["tokens"], int) and out["tokens"] > 0
    torch.testing.assert_close(out["loss"], out["obj_loss"] + out["aux_loss"])
    out["loss"].backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if objective != "text":
        assert model.patch.proj.weight.grad.abs().sum() > 0
    stats = model.moe_stats()
    assert [s["layer"] for s in stats] == [1] and sum(stats[0]["tokens_per_expert"]) == stats[0]["assignments"]


def test_prefix_lm_mask_is_bidirectional_over_prefix_causal_over_target_and_hides_pads():
    valid = torch.tensor([[True, True, False, True, True, False]])
    m = prefix_lm_mask(valid, n_prefix=3)[0, 0]
    assert m[0, 1] and m[1, 0], "prefix positions see each other both ways"
    assert not m[0, 3] and not m[1, 4], "prefix positions never see the target"
    assert m[3, 0] and m[4, 3] and not m[3, 4], "target sees prefix and earlier target only"
    assert not m[:, 2].any() and not m[:, 5].any(), "pad keys are invisible"


def test_future_target_tokens_do_not_change_earlier_predictions_but_prefix_tokens_do():
    torch.manual_seed(1)
    model = M6Model(tiny_cfg()).eval()
    b = make_batch(B=1, T=12)
    img, src = b["image"], b["text"][:, :6]
    tgt = torch.tensor([[BOS_ID, 7, 8, 9, 10]])

    def hidden(src, tgt):
        x, mask, n_prefix, _ = model._assemble(img, src, tgt)
        return model.encoder(x, mask)[0], n_prefix

    h, n_prefix = hidden(src, tgt)
    tgt2 = tgt.clone()
    tgt2[0, 3] = 99
    h2, _ = hidden(src, tgt2)
    torch.testing.assert_close(h[:, : n_prefix + 3], h2[:, : n_prefix + 3])
    assert not torch.allclose(h[:, n_prefix + 3:], h2[:, n_prefix + 3:])
    src2 = src.clone()
    src2[0, 2] = 77  # a later prefix token changes earlier prefix states: bidirectional
    h3, _ = hidden(src2, tgt)
    i = n_prefix - src.shape[1] + 1  # the source token before the changed one
    assert not torch.allclose(h[:, i], h3[:, i])


def test_extra_padding_leaves_losses_and_embeddings_unchanged():
    torch.manual_seed(2)
    model = M6Model(tiny_cfg()).eval()
    b = make_batch(T=10)
    padded = {"image": b["image"], "text": torch.cat([b["text"], torch.zeros(3, 6, dtype=torch.int64)], 1)}
    for obj in ("caption", "contrastive"):
        torch.testing.assert_close(model(b, obj)["loss"], model(padded, obj)["loss"])
    torch.testing.assert_close(model.embed_text(b["text"]), model.embed_text(padded["text"]))


def test_seeded_forward_is_reproducible_for_random_objectives():
    model = M6Model(tiny_cfg())
    b = make_batch()
    for obj in ("text", "mm"):
        torch.manual_seed(5)
        a = model(b, obj)["loss"]
        torch.manual_seed(5)
        assert torch.equal(a, model(b, obj)["loss"])


def test_span_corruption_and_prefix_split_keep_the_text_recoverable():
    torch.manual_seed(0)
    text = make_batch(B=4, T=16)["text"]
    src = span_corrupt(text)
    for s, t in zip(src.tolist(), text.tolist()):
        s = [x for x in s if x != PAD_ID]
        assert s[0] == BOS_ID and s[-1] == EOS_ID and 3 in s  # <mask> id
        t = [x for x in t if x != PAD_ID]
        assert len(s) <= len(t) and s != t
        kept = [x for x in s if x != 3]
        assert all(x in t for x in kept), "unmasked tokens come from the original text"
    srcs, tins, labels = split_prefix(text)
    for s, ti, lab, t in zip(srcs.tolist(), tins.tolist(), labels.tolist(), text.tolist()):
        s = [x for x in s if x]
        lab = [x for x in lab if x]
        assert s + lab == [x for x in t if x], "source + labels reassemble the text"
        assert ti[0] == 4 and [x for x in ti if x][1:] == lab[:-1]


def test_delink_preserves_outputs_and_maps_shared_to_per_layer_names():
    torch.manual_seed(3)
    cfg = tiny_cfg(n_layers=4, share_layers=True)
    model = M6Model(cfg)
    b = make_batch()
    n_shared = sum(p.numel() for p in model.parameters())
    before = {o: model(b, o)["loss"].detach() for o in ("caption", "contrastive")}
    mapping = model.delink()
    after = {o: model(b, o)["loss"].detach() for o in ("caption", "contrastive")}
    for o in before:
        torch.testing.assert_close(before[o], after[o], rtol=0, atol=0)
    assert model.cfg.share_layers is False
    assert mapping["encoder.blocks.1.ffn.experts.w1_EDF"] == ["encoder.blocks.1.ffn.experts.w1_EDF",
                                                              "encoder.blocks.3.ffn.experts.w1_EDF"]
    names = dict(model.named_parameters())
    assert all(t in names for targets in mapping.values() for t in targets)
    assert names["encoder.blocks.3.ffn.experts.w1_EDF"].allreduce is False
    with torch.no_grad():
        names["encoder.blocks.2.attn.qkv.weight"].add_(1.0)
    assert not torch.equal(names["encoder.blocks.0.attn.qkv.weight"], names["encoder.blocks.2.attn.qkv.weight"])
    assert sum(p.numel() for p in model.parameters()) > n_shared


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_kv_cache_generation_equals_full_recomputation(method):
    torch.manual_seed(4)
    model = M6Model(tiny_cfg())
    b = make_batch(B=2)
    kw = dict(image=b["image"], prefix=[[9, 10, 11], [12]], max_new_tokens=8, method=method, num_beams=3)
    assert model.generate(**kw, use_cache=True) == model.generate(**kw, use_cache=False)
    padded = torch.tensor([[BOS_ID, 9, 10, 11, EOS_ID], [BOS_ID, 12, EOS_ID, PAD_ID, PAD_ID]])
    assert model.generate(**{**kw, "prefix": padded}) == model.generate(**kw), "specials in a prefix are ignored"
    cached = Decoder(model.eval(), b["image"], None, BOS_ID, 2, use_cache=True)
    full = Decoder(model, b["image"], None, BOS_ID, 2, use_cache=False)
    with torch.no_grad():
        for tok in (17, 23, 5):
            torch.testing.assert_close(cached.logits(), full.logits(), rtol=1e-5, atol=1e-5)
            cached.push(torch.tensor([tok, tok + 1]))
            full.push(torch.tensor([tok, tok + 1]))
        torch.testing.assert_close(cached.logits(), full.logits(), rtol=1e-5, atol=1e-5)


def test_nucleus_sampling_only_draws_from_the_top_p_mass():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.6, 0.25, 0.1, 0.05]])).repeat(500, 1)
    drawn = set(_nucleus(logits, top_p=0.8).tolist())
    assert drawn == {0, 1}
    assert set(_nucleus(logits, top_p=0.5).tolist()) == {0}


def test_bad_inputs_name_what_is_wrong():
    model = M6Model(tiny_cfg())
    b = make_batch()
    with pytest.raises(ValueError, match="unknown objective"):
        model(b, "denoise")
    with pytest.raises(ValueError, match=r"needs batch\['image'\]"):
        model({"text": b["text"]}, "caption")
    with pytest.raises(ValueError, match=r"\[B,3,32,32\]"):
        model({"text": b["text"], "image": torch.zeros(3, 3, 16, 16)}, "caption")
    with pytest.raises(ValueError, match="max_text_len=32"):
        model({"text": torch.ones(2, 40, dtype=torch.int64)}, "text")
    with pytest.raises(ValueError, match="needs an image, a prefix"):
        model.generate()
    nan_image = b["image"].clone()
    nan_image[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\] contain NaN"):
        model({"text": b["text"], "image": nan_image}, "caption")
    with pytest.raises(ValueError, match=r"rows \[1\] are all padding"):
        model.embed_text(torch.tensor([[BOS_ID, 7, EOS_ID], [PAD_ID, PAD_ID, PAD_ID]]))


def test_tiny_model_overfits_a_few_image_caption_pairs_and_retrieves_them():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = M6Model(cfg)
    b = make_batch(B=4, T=9, seed=7)
    # product-like images: a coloured square on a plain background, one colour per caption
    colours = torch.tensor([[0.8, -0.6, -0.6], [-0.6, 0.8, -0.6], [-0.6, -0.6, 0.8], [0.8, 0.8, -0.6]])
    b["image"] = b["image"] * 0.1 + 0.5
    b["image"][:, :, 8:24, 8:24] = colours.view(4, 3, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(300):
        loss = model(b, "caption")["loss"] + model(b, "contrastive")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert model(b, "caption")["obj_loss"] < 0.05
    want = [[t for t in row if t > EOS_ID] for row in b["text"].tolist()]
    assert model.generate(image=b["image"], method="greedy") == want
    assert model.generate(image=b["image"], method="beam", num_beams=2) == want
    with torch.no_grad():
        sim = model.embed_image(b["image"]) @ model.embed_text(b["text"]).t()
    assert sim.argmax(1).tolist() == [0, 1, 2, 3]
    norms = model.embed_image(b["image"]).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(4))


def test_a_local_torchscript_backbone_replaces_the_patch_stem(tmp_path):
    torch.manual_seed(6)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 8, stride=8), torch.nn.ReLU())
    path = tmp_path / "backbone.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    model = M6Model(tiny_cfg())
    model.load_backbone(str(path))
    out = model(make_batch(), "caption")
    out["loss"].backward()
    assert model.patch.proj.weight.shape[1] == 12 and model.patch.proj.weight.grad is not None
    with pytest.raises(ValueError, match="one feature vector per 8-px patch"):
        model.load_backbone(torch.nn.Conv2d(3, 12, 4, stride=4))
    with pytest.raises(ValueError, match="does not exist"):
        model.load_backbone(str(tmp_path / "missing.pt"))
