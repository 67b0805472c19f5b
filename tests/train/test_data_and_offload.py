"""The resumable shard stream, per-rank batches, and the granular-offload optimizer."""

from __future__ import annotations

import torch

from m6 import storage
from m6.config import preset
from m6.data.tokenizer import load_tokenizer
from m6.train.data import BatchMaker, ShardStream
from m6.train.offload import GranularOffloadAdamW


def _keys(stream: ShardStream, n: int) -> list[str]:
    it = iter(stream)
    return [next(it)[1]["__key__"] for _ in range(n)]


def _first_epoch(stream: ShardStream) -> list[str]:
    out = []
    for (epoch, _, _), sample in stream:
        if epoch > 0:
            return out
        out.append(sample["__key__"])
    return out


def test_ranks_read_disjoint_samples_that_cover_the_train_split(corpus):
    manifest = storage.read_json(storage.join(corpus, "manifest.json"))
    per_rank = [_first_epoch(ShardStream(corpus, rank=r, world_size=2, seed=3, shuffle_buffer=1)) for r in range(2)]
    assert per_rank[0] and per_rank[1]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == manifest["split"]["counts"]["train"]
    # Fewer shards than ranks: every rank reads every shard and keeps every world-th sample.
    per_rank4 = [_first_epoch(ShardStream(corpus, rank=r, world_size=4, seed=3, shuffle_buffer=1)) for r in range(4)]
    assert sum(map(len, per_rank4)) == manifest["split"]["counts"]["train"]
    assert len(set().union(*map(set, per_rank4))) == manifest["split"]["counts"]["train"]


def test_shuffle_is_seeded(corpus):
    assert _keys(ShardStream(corpus, seed=7), 40) == _keys(ShardStream(corpus, seed=7), 40)
    assert _keys(ShardStream(corpus, seed=7), 40) != _keys(ShardStream(corpus, seed=8), 40)


def test_saved_position_continues_exactly(corpus):
    cfg = preset("tiny")
    tok = load_tokenizer(storage.join(corpus, "tokenizer.json"))

    def maker():
        return BatchMaker(ShardStream(corpus, rank=1, world_size=2, seed=5, shuffle_buffer=64), tok, cfg.model, cfg.train)

    a = maker()
    for s in range(30):  # past an epoch boundary of this rank's half of the corpus
        a.batch(s)
    state = a.state()
    expect = [a.batch(s) for s in range(30, 40)]
    b = maker()
    b.load_state(state)
    got = [b.batch(s) for s in range(30, 40)]
    for (oa, ba), (ob, bb) in zip(expect, got):
        assert oa == ob and ba.keys() == bb.keys()
        assert all(torch.equal(ba[k], bb[k]) for k in ba)


def test_stream_reads_shards_from_s3(corpus, s3_env):
    uri = s3_env + "/ds"
    storage.upload_dir(corpus, uri)
    local = _keys(ShardStream(corpus, rank=0, world_size=1, seed=1, shuffle_buffer=16), 50)
    remote = _keys(ShardStream(uri, rank=0, world_size=1, seed=1, shuffle_buffer=16), 50)
    assert local == remote


def test_granular_offload_keeps_chosen_layers_state_on_the_host_and_matches_adamw():
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
    ref = [torch.nn.Linear(8, 8) for _ in range(3)]
    for r, l in zip(ref, layers):
        r.load_state_dict(l.state_dict())
    names = {id(p): int(n.split(".")[0]) for n, p in layers.named_parameters()}
    opt = GranularOffloadAdamW([{"params": list(layers.parameters()), "weight_decay": 0.01}], lr=1e-2,
                               offload_layers={0, 2}, layer_of=lambda p: names[id(p)])
    ref_opt = torch.optim.AdamW([p for r in ref for p in r.parameters()], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    for _ in range(5):
        x = torch.randn(4, 8)
        for mods, o in ((layers, opt), (ref, ref_opt)):
            o.zero_grad()
            h = x
            for m in mods:
                h = torch.tanh(m(h))
            h.pow(2).sum().backward()
            o.step()
    assert opt.placement() == {0: "cpu", 1: "cpu", 2: "cpu"}  # this machine has no accelerator: all host
    for p in layers.parameters():
        st = opt.state[p]
        assert ("master" in st) == (names[id(p)] in {0, 2})
        assert opt.is_offloaded(p) == (names[id(p)] in {0, 2})
        if "master" in st:
            assert st["master"].device.type == "cpu" and st["master"].data_ptr() != p.data_ptr()
    for a, b in zip(layers.parameters(), (p for r in ref for p in r.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
