"""Streaming training data: per-rank shard assignment, a seeded shuffle buffer, a resumable position, and batches."""

from __future__ import annotations

import io
import logging
import random
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import torch

from m6.config import BOS_ID, EOS_ID, PAD_ID, ModelConfig, TrainConfig
from m6.errors import UserError

log = logging.getLogger(__name__)
IMAGE_OBJECTIVES = ("caption", "mm", "contrastive")

Ref = tuple[int, int, int]
"""Where a sample came from: (epoch, index of the shard in the dataset, sample offset in the shard)."""


class ShardStream:
    """An endless, deterministic stream of one rank's training samples.

    With at least as many shards as ranks each rank reads whole shards (``shards[rank::world]``
    of the epoch's permutation); with fewer, every rank reads all shards and keeps every
    ``world``-th sample, so small corpora still split evenly. A shuffle buffer mixes samples
    across shards. :meth:`state` records the read position and the buffer as sample references,
    so :meth:`load_state` continues exactly where a run stopped: nothing re-read into training,
    nothing skipped.
    """

    def __init__(self, dataset_uri: str, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 256, split: str = "train") -> None:
        from m6.data import shards

        self._shards = shards
        self.dataset_uri = dataset_uri
        try:
            self.manifest = shards.read_manifest(dataset_uri)
        except FileNotFoundError:
            raise UserError(f"{dataset_uri}: no manifest.json; is this a curated dataset (m6 curate)?") from None
        self.uris = shards.shard_uris(dataset_uri, self.manifest)
        if not self.uris:
            raise UserError(f"{dataset_uri}: the manifest lists no shards")
        sp = self.manifest.get("split") or {}
        self.val_fraction = float(sp.get("val_fraction", 0.0))
        self.test_fraction = float(sp.get("test_fraction", 0.0))
        self.rank, self.world, self.seed, self.split = rank, world_size, seed, split
        self.buffer_size = max(1, shuffle_buffer)
        self.epoch, self.cursor, self.offset = 0, 0, 0
        """The position: epoch, index into this rank's shard list, samples already read from that shard."""
        self.buffer: list[tuple[Ref, dict]] = []
        self.rng = random.Random(f"{seed}:{rank}")
        self.counts: Counter[str] = Counter()

    # ------------------------------------------------------------------ order
    def _my_shards(self, epoch: int) -> list[int]:
        order = list(range(len(self.uris)))
        random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
        return order[self.rank::self.world] if len(order) >= self.world else order

    def _keeps(self, offset: int) -> bool:
        return len(self.uris) >= self.world or offset % self.world == self.rank

    def _wanted(self, sample: dict) -> bool:
        if self.split == "all":
            return True
        return self._shards.split_of(sample["__key__"], self.val_fraction, self.test_fraction) == self.split

    def _read(self) -> Iterator[tuple[Ref, dict]]:
        """Samples in file order from the current position on, advancing it."""
        empty_epochs = 0
        while True:
            mine = self._my_shards(self.epoch)
            got = 0
            while self.cursor < len(mine):
                idx = mine[self.cursor]
                for off, sample in enumerate(self._shards.iter_shard(self.uris[idx])):
                    if off < self.offset:
                        continue
                    self.offset = off + 1
                    if not self._keeps(off):
                        continue
                    if not self._wanted(sample):
                        self.counts["other_split"] += 1
                        continue
                    got += 1
                    yield (self.epoch, idx, off), sample
                self.cursor, self.offset = self.cursor + 1, 0
            self.epoch, self.cursor = self.epoch + 1, 0
            empty_epochs = 0 if got else empty_epochs + 1
            if empty_epochs >= 2:
                raise UserError(f"{self.dataset_uri}: rank {self.rank} finds no {self.split!r} samples in its shards")

    def __iter__(self) -> Iterator[tuple[Ref, dict]]:
        reader = self._read()
        while True:
            ref_sample = next(reader)
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(ref_sample)
                continue
            i = self.rng.randrange(len(self.buffer))
            out, self.buffer[i] = self.buffer[i], ref_sample
            self.counts["samples"] += 1
            yield out

    # ------------------------------------------------------------------ position
    def state(self) -> dict[str, Any]:
        """A JSON-able position: read cursor, buffered sample references, shuffle RNG."""
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset,
                "buffer": [list(r) for r, _ in self.buffer], "rng": _rng_to_json(self.rng.getstate()),
                "samples": self.counts["samples"]}

    def load_state(self, st: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state` (re-reading only the shards the buffer came from)."""
        self.epoch, self.cursor, self.offset = int(st["epoch"]), int(st["cursor"]), int(st["offset"])
        self.rng.setstate(_rng_from_json(st["rng"]))
        self.counts["samples"] = int(st.get("samples", 0))
        self.buffer = fetch_refs(self, [tuple(r) for r in st["buffer"]])


def fetch_refs(stream: ShardStream, refs: list[Ref]) -> list[tuple[Ref, dict]]:
    """Read the samples named by ``refs`` (in that order), one pass per shard involved."""
    by_shard: dict[int, set[int]] = {}
    for _, idx, off in refs:
        by_shard.setdefault(idx, set()).add(off)
    found: dict[tuple[int, int], dict] = {}
    for idx, offs in by_shard.items():
        for off, sample in enumerate(stream._shards.iter_shard(stream.uris[idx])):
            if off in offs:
                found[(idx, off)] = sample
            if off >= max(offs):
                break
    missing = [r for r in refs if (r[1], r[2]) not in found]
    if missing:
        raise UserError(f"{stream.dataset_uri}: saved data position names samples that are gone: {missing[:3]}")
    return [(r, found[(r[1], r[2])]) for r in refs]


def _rng_to_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _rng_from_json(obj: list) -> tuple:
    return (obj[0], tuple(obj[1]), obj[2])


class BatchMaker:
    """Turns the sample stream into per-objective tensor batches (the M6 pretraining mix).

    The objective of each step is drawn from ``objective_weights`` with a step-seeded RNG, so
    every rank runs the same objective (and graph) at the same step. Image objectives take
    image-text samples; ``text`` takes text-only samples first, then captions of image samples.
    """

    def __init__(self, stream: ShardStream, tokenizer: Any, model: ModelConfig, train: TrainConfig) -> None:
        self.stream, self.tok, self.m, self.t = stream, tokenizer, model, train
        self.it = iter(stream)
        self.text_q: deque[tuple[Ref, dict]] = deque()
        self.image_q: deque[tuple[Ref, dict]] = deque()
        self.counts: Counter[str] = Counter()
        names = [k for k, v in train.objective_weights.items() if v > 0]
        self.objectives, self.weights = names, [train.objective_weights[k] for k in names]
        self.use_text_only = "text" in names

    def objective_for(self, step: int) -> str:
        return random.Random(f"{self.t.seed}:objective:{step}").choices(self.objectives, self.weights)[0]

    def _pull(self) -> None:
        ref, s = next(self.it)
        has_image = "jpg" in s or "png" in s
        if has_image:
            self.image_q.append((ref, s))
        elif self.use_text_only:
            self.text_q.append((ref, s))
        else:
            self.counts["dropped_text_only_no_text_objective"] += 1

    def _take(self, objective: str, n: int, max_pulls: int = 100_000) -> list[dict]:
        out: list[dict] = []
        pulls = 0
        while len(out) < n:
            if objective == "text" and self.text_q:
                out.append(self.text_q.popleft()[1])
            elif self.image_q:
                out.append(self.image_q.popleft()[1])
            else:
                self._pull()
                pulls += 1
                if pulls > max_pulls:
                    raise UserError(f"objective {objective!r} needs image-text samples but the corpus has none; "
                                    f"set its train.objective_weights entry to 0")
        return out

    def batch(self, step: int) -> tuple[str, dict[str, torch.Tensor]]:
        """The objective and the tensors of ``step`` for this rank."""
        objective = self.objective_for(step)
        samples = self._take(objective, self.t.micro_batch_size)
        self.counts[f"batches_{objective}"] += 1
        batch = {"text": self.encode_texts([s.get("txt", "") for s in samples])}
        if objective in IMAGE_OBJECTIVES:
            batch["image"] = torch.stack([self.decode_image(s) for s in samples])
        return objective, batch

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """``<s> ids </s>`` truncated to max_text_len, right-padded with ``<pad>`` to the longest."""
        limit = self.m.max_text_len - 2
        rows = [[BOS_ID, *self.tok.encode(t).ids[:limit], EOS_ID] for t in texts]
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
        return out

    def decode_image(self, sample: dict) -> torch.Tensor:
        """Decode, center-crop square, resize to the model's image size, scale to [-1, 1]; ``[3, S, S]``."""
        from PIL import Image

        raw = sample.get("jpg") or sample.get("png")
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        w, h = img.size
        side = min(w, h)
        img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        s = self.m.image_size
        if img.size != (s, s):
            img = img.resize((s, s), Image.BICUBIC)
        arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(s, s, 3)
        return arr.permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    # ------------------------------------------------------------------ position
    def state(self) -> dict[str, Any]:
        return {"stream": self.stream.state(), "text_q": [list(r) for r, _ in self.text_q],
                "image_q": [list(r) for r, _ in self.image_q], "counts": dict(self.counts)}

    def load_state(self, st: dict[str, Any]) -> None:
        self.stream.load_state(st["stream"])
        self.it = iter(self.stream)
        self.text_q = deque(fetch_refs(self.stream, [tuple(r) for r in st["text_q"]]))
        self.image_q = deque(fetch_refs(self.stream, [tuple(r) for r in st["image_q"]]))
        self.counts = Counter(st.get("counts", {}))
