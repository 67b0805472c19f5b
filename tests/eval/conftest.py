"""Eval fixtures: a small curated-format dataset of synthetic product images, and a tiny model trained on it."""

from __future__ import annotations

import random
import time

import pytest

from m6 import storage
from m6.config import preset

# A learnable slice of the demo corpus's attribute space: 4 kinds × 4 colours, varied pattern.
KINDS, COLORS = (0, 1, 2, 3), (0, 1, 2, 3)


def make_dataset(uri: str, n: int = 96, seed: int = 0, test_fraction: float = 0.3, n_docs: int = 24,
                 n_heldout: int = 8) -> dict:
    """Write ``n`` image-caption samples and ``n_docs`` text documents as m6.shards/v1 with a tokenizer.

    Every sample's split is the key-hash split of ``m6.data.shards.split_of``; returns the manifest.
    """
    from m6.data import synth
    from m6.data.shards import SCHEMA, SPLIT_METHOD, ShardWriter, split_of
    from m6.data.tokenizer import save_tokenizer, train_tokenizer

    rng = random.Random(seed)
    writer = ShardWriter(uri, max_samples=40, max_bytes=1 << 24)
    counts = {"train": 0, "val": 0, "test": 0}
    texts = []
    for i in range(n):
        a = {"kind": rng.choice(KINDS), "color": rng.choice(COLORS), "pattern": rng.randrange(2), "size": 1,
             "position": 0, "background": 0}
        caps = synth.captions_for(a, "en", rng, n=2)
        img = synth.render(a, rng, size=(48, 48))
        key = f"s{seed}-{i:05d}"
        split = split_of(key, 0.0, test_fraction)
        counts[split] += 1
        texts.extend(caps)
        writer.write({"__key__": key, "jpg": synth._encode(img, "jpg"), "txt": caps[0],
                      "json": {"captions": caps, "split": split, "attributes": synth.attr_names(a), "lang": "en"}})
    # Held-out items as curation marks them: split "test" whatever their key hash says.
    for j in range(n_heldout):
        a = {"kind": rng.choice(KINDS), "color": rng.choice(COLORS), "pattern": 2, "size": 1, "position": 0,
             "background": 0}
        caps = synth.captions_for(a, "en", rng, n=2)
        key = f"h{seed}-{j:05d}"
        counts["test"] += 1
        texts.extend(caps)
        writer.write({"__key__": key, "jpg": synth._encode(synth.render(a, rng, size=(48, 48)), "jpg"), "txt": caps[0],
                      "json": {"captions": caps, "split": "test", "heldout": True, "lang": "en"}})
    for j in range(n_docs):
        a = {"kind": rng.choice(KINDS), "color": rng.choice(COLORS), "pattern": rng.randrange(4), "size": rng.randrange(2),
             "position": rng.randrange(5), "background": rng.randrange(4)}
        doc = synth.document_for(a, "en", rng)
        key = f"d{seed}-{j:05d}"
        split = split_of(key, 0.0, test_fraction)
        counts[split] += 1
        texts.append(doc)
        writer.write({"__key__": key, "txt": doc, "json": {"kind": "text", "split": split, "lang": "en"}})
    shards = writer.close()
    save_tokenizer(train_tokenizer(texts, vocab_size=400), storage.join(uri, "tokenizer.json"))
    manifest = {"schema": SCHEMA, "shards": shards, "num_samples": n + n_heldout + n_docs,
                "split": {"method": SPLIT_METHOD, "val_fraction": 0.0, "test_fraction": test_fraction, "counts": counts},
                "tokenizer": "tokenizer.json", "image_size": 48, "config": {}}
    storage.write_json(storage.join(uri, "manifest.json"), manifest)
    return manifest


def train_tiny(data_uri: str, steps: int = 320, seed: int = 0, lr: float = 3e-3, warmup: int = 50):
    """A tiny M6Model trained with a plain torch loop on the contrastive and caption objectives of the train split."""
    import torch

    from m6.data.shards import iter_dataset
    from m6.data.tokenizer import load_tokenizer
    from m6.eval.data import image_tensor, text_tensor
    from m6.model.m6 import M6Model

    torch.manual_seed(seed)
    cfg = preset("tiny")
    tok = load_tokenizer(data_uri)
    cfg.model.vocab_size = tok.get_vocab_size()
    pairs = [(s["jpg"], cap) for s in iter_dataset(data_uri, "train") if "jpg" in s for cap in s["json"]["captions"]]
    images = image_tensor([p[0] for p in pairs], cfg.model.image_size)
    texts = text_tensor([p[1] for p in pairs], tok, cfg.model.max_text_len)
    model = M6Model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # linear warm-up: a full learning rate on step one can collapse the contrastive embeddings
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    g = torch.Generator().manual_seed(seed)
    # One thread: on a shared 2-core machine two threads per process oversubscribe and run ~6x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        idx = torch.randperm(len(pairs), generator=g)[:24]
        batch = {"image": images[idx], "text": texts[idx]}
        con, cap = model(batch, "contrastive"), model(batch, "caption")
        loss = con["loss"] + cap["loss"]
        if step % 10 == 0 or step == steps - 1:
            losses.append({"step": step + 1, "loss": {"contrastive": con["obj_loss"].item(), "caption": cap["obj_loss"].item()}})
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    torch.set_num_threads(threads)
    model.eval()
    meta = {"step": steps, "checkpoint": f"in-memory tiny@{steps}", "data_uri": data_uri,
            "train_s": time.perf_counter() - t0, "final_loss": loss.item(), "losses": losses}
    return model, cfg, tok, meta


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on 2 shared cores it oversubscribes them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("evaldata") / "ds")
    make_dataset(uri)
    return uri


@pytest.fixture(scope="session")
def other_data(tmp_path_factory) -> str:
    """A second dataset of the same kind (another seed): what a retraining curates."""
    uri = str(tmp_path_factory.mktemp("otherdata") / "ds")
    make_dataset(uri, n=60, seed=1)
    return uri


@pytest.fixture(scope="session")
def trained(eval_data):
    return train_tiny(eval_data)


@pytest.fixture(scope="session")
def trained_run(trained, tmp_path_factory) -> str:
    """The trained tiny model saved as a training run: a COMPLETE checkpoint, tokenizer and metrics.jsonl."""
    import json

    from m6.train.checkpoint import publish, save, step_dir

    model, cfg, tok, meta = trained
    run = str(tmp_path_factory.mktemp("run") / "out")
    root = storage.join(run, "checkpoints")
    ckpt = step_dir(root, meta["step"])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save(ckpt, rank=0, rank_state={}, model_state=state, tokenizer_json=tok.to_str(),
         meta={"config": cfg.to_dict(), "step": meta["step"], "data_uri": meta["data_uri"]})
    publish(ckpt, root, keep_last=1, step=meta["step"])
    storage.write_text(storage.join(run, "tokenizer.json"), tok.to_str())
    storage.write_text(storage.join(run, "metrics.jsonl"), "\n".join(json.dumps(r) for r in meta["losses"]) + "\n")
    return run
