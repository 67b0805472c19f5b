"""The curation job: sources → parallel filtering → global dedup → shards, manifest, stats, tokenizer, report."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from m6 import storage
from m6.config import DataConfig
from m6.data.dedup import Deduplicator
from m6.data.filters import REASONS
from m6.data.shards import SCHEMA, SPLIT_METHOD, ShardWriter, heldout_key, iter_shard, split_of
from m6.data.sources import Partition, discover
from m6.data.worker import completed_part, part_uris, process_partition, thumbnail
from m6.errors import UserError

log = logging.getLogger(__name__)
WORK_DIR = "_work"
HIST_MAX_SIDE_PX = 2048
MAX_EXAMPLES = 8


def _run_partition(args: tuple[Partition, DataConfig, str]) -> dict:
    part, cfg, work = args
    return process_partition(part, cfg, work)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", mininterval=2.0, smoothing=0.1, dynamic_ncols=True)


def _partition_results(parts: list[Partition], cfg: DataConfig, work: str, workers: int) -> tuple[int, Iterator[dict]]:
    """How many partitions are resumed, and every partition's stats in partition order as each becomes ready.

    Results come in order (``Pool.imap``), so the serial dedup/shard stage consumes partition
    ``i`` while the workers are still curating ``i+1, i+2, …``: the two stages overlap.
    """
    done: dict[int, dict] = {}
    todo = []
    for p in parts:
        st = completed_part(p, cfg, work)
        if st is not None:
            done[p.index] = st
        else:
            todo.append(p)
    if done:
        log.info("resuming: %d of %d partitions already complete and verified", len(done), len(parts))

    def ordered() -> Iterator[dict]:
        bar = _progress(sum((p.stop - p.start) if p.stop is not None else 1 for p in todo), "curate")
        pool = None
        try:
            if workers <= 1 or len(todo) <= 1:
                results: Iterator[dict] = (process_partition(p, cfg, work) for p in todo)
            else:
                ctx = mp.get_context("spawn" if os.environ.get("M6_MP_SPAWN") else "fork")
                pool = ctx.Pool(min(workers, len(todo)))
                results = pool.imap(_run_partition, [(p, cfg, work) for p in todo])
            for p in parts:
                if p.index in done:
                    yield done[p.index]
                    continue
                st = next(results)
                bar.update(st["read"])
                yield st
            if pool is not None:
                pool.close()
                pool.join()
                pool = None
        finally:
            if pool is not None:  # an error or an interrupt: stop the workers now
                pool.terminate()
                pool.join()
            bar.close()

    return len(done), ordered()


class _Hist:
    """Bounded histograms: counts per integer bin, never a list of values."""

    def __init__(self) -> None:
        self.side_px: Counter = Counter()
        self.caption_chars: Counter = Counter()
        self.text_chars: Counter = Counter()

    def add(self, sample: dict) -> None:
        meta = sample["json"]
        n = len(sample["txt"])
        if meta["kind"] == "image":
            self.side_px[min(min(meta["orig_size"]), HIST_MAX_SIDE_PX)] += 1
            self.caption_chars[n] += 1
        else:
            self.text_chars[min(n, 4096)] += 1

    def to_dict(self) -> dict:
        return {k: {str(b): c for b, c in sorted(getattr(self, k).items())}
                for k in ("side_px", "caption_chars", "text_chars")}


def _final_stage(parts: list[Partition], results: Iterator[dict], cfg: DataConfig, output: str, work: str,
                 text_path: Path) -> dict:
    """Stream candidates in partition order: global dedup, split, write final shards, collect texts."""
    dedup = Deduplicator(cfg)
    writer = ShardWriter(output, cfg.shard_max_samples, cfg.shard_max_bytes, reuse=True)
    dropped: Counter = Counter()
    examples: dict[str, list[dict]] = {}
    split_counts: Counter = Counter()
    kept_by: Counter = Counter()
    kept_per_input: Counter = Counter()
    hist = _Hist()
    heldout = 0
    part_stats: list[dict] = []
    with open(text_path, "w", encoding="utf-8") as texts:
        for p, st in zip(parts, results):
            part_stats.append(st)
            for s in iter_shard(part_uris(work, p.index)[0]):
                meta = s["json"]
                d = meta.pop("_dedup")
                if meta["kind"] == "image":
                    reason = dedup.check_image(d["pixel"], int(d["phash"]), bytes.fromhex(d["color"]))
                else:
                    reason = dedup.check_text(d["text"], d.get("minhash"))
                if reason is not None:
                    dropped[reason] += 1
                    ex = examples.setdefault(reason, [])
                    if len(ex) < MAX_EXAMPLES:
                        ex.append({"key": s["__key__"], "text": s["txt"][:120],
                                   "thumb": thumbnail(s.get("jpg") or s.get("png"))})
                    continue
                # Held-out attribute combinations always go to test (evaluation measures generalisation on
                # them); renaming the key keeps split_of(key) the single rule every reader applies.
                if meta.get("heldout"):
                    s["__key__"] = heldout_key(s["__key__"], cfg.val_fraction, cfg.test_fraction)
                meta["split"] = split_of(s["__key__"], cfg.val_fraction, cfg.test_fraction)
                heldout += int(bool(meta.get("heldout")))
                split_counts[meta["split"]] += 1
                kept_by[(meta["kind"], meta["lang"])] += 1
                kept_per_input[p.input_index] += 1
                hist.add(s)
                writer.write(s)
                for t in meta.get("captions") or [s["txt"]]:
                    texts.write(t.replace("\n", " ") + "\n")
    shards = writer.close()
    return {"part_stats": part_stats, "shards": shards, "reused_shards": writer.reused, "dropped": dropped, "examples": examples,
            "split": {k: split_counts.get(k, 0) for k in ("train", "val", "test")}, "kept_by": kept_by,
            "kept_per_input": kept_per_input, "hist": hist.to_dict(), "heldout": heldout}


def _iter_lines(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def curate(inputs: list[str], output: str, cfg: DataConfig, fmt: str | None = None) -> dict:
    """Curate raw image-text sources into a ``m6.shards/v1`` dataset at ``output``.

    Args:
        inputs: local folders/files or ``s3://`` prefixes; formats detected unless ``fmt`` is given.
        output: the dataset folder/prefix (shards, manifest.json, stats.json, tokenizer.json, report.html).
        cfg: filters, sizes, split and tokenizer settings; ``cfg.workers`` worker processes.
        fmt: force one source format for every input (see ``m6.data.sources.FORMATS``).

    Returns:
        The stats (also written to ``stats.json``); ``kept + Σ dropped == read`` always.

    Raises:
        UserError: a run-level problem (missing or unreadable input, nothing kept), naming the input.
    """
    from m6.data.report import write_report
    from m6.data.tokenizer import save_tokenizer, train_tokenizer

    if not inputs:
        raise UserError("curate: give at least one --input")
    t0 = time.perf_counter()
    parts = discover(inputs, fmt)
    work = storage.join(output, WORK_DIR)
    for name in ("COMPLETE", "manifest.json"):  # an earlier dataset here stops being readable while rewritten
        if storage.exists(storage.join(output, name)):
            storage.delete(storage.join(output, name))
    log.info("curating %d inputs as %d partitions with %d workers into %s", len(inputs), len(parts), cfg.workers, output)
    resumed, results = _partition_results(parts, cfg, work, cfg.workers)
    with tempfile.TemporaryDirectory(prefix="m6-curate-") as tmp:
        try:
            final = _final_stage(parts, results, cfg, output, work, Path(tmp) / "texts.txt")
        finally:
            results.close()  # on an error, stops the worker pool before the error propagates
        part_stats = final["part_stats"]
        read = sum(s["read"] for s in part_stats)
        dropped: Counter = Counter()
        modified: Counter = Counter()
        examples: dict[str, list[dict]] = {}
        for s in part_stats:
            dropped.update(s["dropped"])
            modified.update(s["modified"])
            for r, ex in s["examples"].items():
                examples.setdefault(r, []).extend(ex[: max(0, MAX_EXAMPLES - len(examples.get(r, [])))])
        dropped.update(final["dropped"])
        for r, ex in final["examples"].items():
            examples.setdefault(r, []).extend(ex)
        kept = sum(sh["samples"] for sh in final["shards"])
        if kept + sum(dropped.values()) != read:
            raise RuntimeError(f"accounting broke: kept {kept} + dropped {sum(dropped.values())} != read {read}")
        by_input = []
        for i, uri in enumerate(inputs):
            ps = [s for p, s in zip(parts, part_stats) if p.input_index == i]
            by_input.append({"input": uri, "formats": sorted({p.fmt for p in parts if p.input_index == i}),
                             "partitions": len(ps), "read": sum(s["read"] for s in ps),
                             "kept": final["kept_per_input"].get(i, 0)})
        duration_s = time.perf_counter() - t0
        stats = {
            "schema": "m6.curate-stats/v1", "read": read, "kept": kept, "dropped_total": sum(dropped.values()),
            "dropped": {r: dropped.get(r, 0) for r in REASONS},
            "modified": dict(sorted(modified.items())),
            "kept_by_kind": {k: sum(v for (kk, _), v in final["kept_by"].items() if kk == k) for k in ("image", "text")},
            "kept_by_lang": {lang: sum(v for (_, ll), v in final["kept_by"].items() if ll == lang) for lang in ("en", "zh")},
            "heldout_kept": final["heldout"], "split": final["split"], "by_input": by_input,
            "shards": len(final["shards"]), "reused_shards": final["reused_shards"], "resumed_partitions": resumed,
            "workers": cfg.workers, "duration_s": round(duration_s, 3),
            "worker_stage_s": round(sum(s["duration_s"] for s in part_stats), 3),
            "samples_per_s": round(read / max(duration_s, 1e-9), 1), "histograms": final["hist"],
            "reasons": REASONS,
        }
        if kept == 0:
            storage.write_json(storage.join(output, "stats.json"), stats)
            raise UserError(f"curate: no sample survived the filters ({read} read); see {storage.join(output, 'stats.json')}")
        tok = train_tokenizer(_iter_lines(Path(tmp) / "texts.txt"), cfg.tokenizer_vocab_size)
        save_tokenizer(tok, storage.join(output, "tokenizer.json"))
    stats["tokenizer_vocab_size"] = tok.get_vocab_size()
    duration_s = time.perf_counter() - t0  # everything but writing the report and manifest
    stats["duration_s"] = round(duration_s, 3)
    stats["samples_per_s"] = round(read / max(duration_s, 1e-9), 1)
    # Drop shards left over from an earlier, larger run into the same place.
    names = {sh["name"] for sh in final["shards"]}
    for u in storage.list_uris(output, recursive=False):
        b = storage.basename(u)
        if b.startswith("shard-") and b.endswith(".tar") and b not in names:
            storage.delete(u)
    storage.write_json(storage.join(output, "stats.json"), stats)
    write_report(output, stats, examples, {s["partition"]["index"]: s.get("kept_examples", []) for s in part_stats})
    manifest = {
        "schema": SCHEMA, "shards": final["shards"], "num_samples": kept,
        "split": {"method": SPLIT_METHOD, "val_fraction": cfg.val_fraction,
                  "test_fraction": cfg.test_fraction, "counts": final["split"]},
        "tokenizer": "tokenizer.json", "image_size": cfg.image_size, "image_format": cfg.image_format,
        "stats": "stats.json", "report": "report.html", "inputs": list(inputs), "config": dataclasses.asdict(cfg),
    }
    storage.write_json(storage.join(output, "manifest.json"), manifest)
    storage.delete_tree(work)
    storage.publish(output, content={"num_samples": kept, "shards": len(final["shards"])})
    log.info("curated %d of %d samples into %d shards in %.1fs (%.0f samples/s)", kept, read, len(final["shards"]),
             duration_s, stats["samples_per_s"])
    return stats
