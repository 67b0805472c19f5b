"""One training process (rank): build model and engine, stream batches, log, checkpoint, resume, delink."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import torch

from m6 import storage
from m6.config import Config
from m6.errors import UserError
from m6.train import checkpoint as ckpt_mod
from m6.train.dsconfig import resolve_precision, trainer_clips
from m6.train.metrics import TrainMetrics

log = logging.getLogger("m6.train")


class Preempted:
    """SIGTERM (preemption, pod eviction) sets a flag; the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.flag = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def agreed(self, device: Any) -> bool:
        """True on every rank once any rank got SIGTERM (collective)."""
        import torch.distributed as dist

        t = torch.tensor([1.0 if self.flag else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def run(cfg: Config, data_uri: str, out_uri: str, *, resume: str | None = None, metrics_port: int | None = None) -> dict:
    """Train this rank until ``cfg.train.steps``; rank 0 returns (and writes) the run summary."""
    import torch.distributed as dist

    from m6.data.tokenizer import load_tokenizer
    from m6.model.m6 import M6Model
    from m6.model.params import count_params
    from m6.train.data import BatchMaker, ShardStream
    from m6.train.engine import build_engine, clip_gradients, expert_groups, grad_norm, init_distributed, peak_flops

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    init_distributed(on_gpu)
    preempt = Preempted()
    t = cfg.train
    ep = t.ep_size
    if world % ep:
        raise UserError(f"--ep {ep} does not divide the number of processes {world}")
    from m6.data.shards import read_manifest

    manifest = read_manifest(data_uri)
    tok_uri = storage.join(data_uri, manifest.get("tokenizer", "tokenizer.json"))
    tokenizer = load_tokenizer(tok_uri)
    tok_json = tokenizer.to_str()
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.get_vocab_size(),
                                    share_layers=cfg.model.share_layers or t.p2r_delink_step is not None)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    has_moe = model_cfg.moe_every > 0 and any(model_cfg.is_moe_layer(i) for i in range(model_cfg.n_layers))
    ep_group = expert_groups(ep) if has_moe else None
    # Same init seed on every rank: replicated weights start equal, and experts differ only by EP rank.
    torch.manual_seed(t.seed)
    model = M6Model(model_cfg, ep_group=ep_group if ep > 1 else None)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    engine, _, sched = build_engine(model, cfg, world_size=world, on_gpu=on_gpu, ep_size=ep)
    torch.manual_seed(t.seed + 1000 + rank)  # span corruption / split points differ per rank, reproducibly

    stream = ShardStream(data_uri, rank=rank, world_size=world, seed=t.seed, shuffle_buffer=t.shuffle_buffer)
    batches = BatchMaker(stream, tokenizer, model_cfg, t)
    root = storage.join(out_uri, "checkpoints")
    start_step, tokens_seen, resumed_from, rng = 0, 0, None, None
    if resume == "auto":
        found = ckpt_mod.latest_complete(root)
        if found:
            if not ckpt_mod.read_meta(found)["config"]["model"]["share_layers"] and model.cfg.share_layers:
                model.delink()  # the checkpoint was written after the Pseudo-to-Real switch
                engine, _, sched = build_engine(model, cfg, world_size=world, on_gpu=on_gpu, ep_size=ep)
            start_step, tokens_seen, rng = _restore(found, rank, engine, sched, batches, world)
            resumed_from = found
            if rank == 0:
                log.info("resumed from %s at step %d", found, start_step)
    if rank == 0:
        storage.write_text(storage.join(out_uri, "tokenizer.json"), tok_json)

    flops = count_params(model_cfg)["train_flops_per_token"]
    peak, peak_src = peak_flops(on_gpu)
    monitor = _energy_monitor(cfg, out_uri, rank, world, local_rank, flops)
    registry = monitor.registry if monitor is not None else None
    if registry is None and metrics_port is not None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
    metrics = TrainMetrics(out_uri, rank=rank, world=world, total_steps=t.steps, flops_per_token=flops,
                           peak_flops_per_rank=peak, registry=registry, start_step=start_step)
    if metrics_port is not None:
        _serve(monitor, registry, metrics_port + rank)
    if rank == 0 and resumed_from:
        old = storage.join(out_uri, "metrics.jsonl")
        if storage.exists(old):
            metrics.lines = [json.loads(x) for x in storage.read_text(old).splitlines() if x.strip()
                             and json.loads(x)["step"] <= start_step]

    first_loss, last_rec, last_ckpt, step, last_norm = None, None, resumed_from, start_step, float("nan")
    losses_by_step: list[dict] = []
    own_clip = trainer_clips(t, on_gpu)
    act_dtype = torch.bfloat16 if resolve_precision(t, on_gpu) == "bf16" else torch.float32
    if rng is not None:  # last, so nothing during set-up draws from the restored generators
        ckpt_mod.set_rng_state(rng)
    t0 = time.monotonic()
    stopped_early = False
    if monitor is not None:
        monitor.begin("train")
    for step in range(start_step, t.steps):
        if t.p2r_delink_step is not None and step == t.p2r_delink_step and engine.module.model.cfg.share_layers:
            from m6.train.p2r import delink_and_rebuild

            engine, sched = delink_and_rebuild(engine, sched, cfg, world=world, on_gpu=on_gpu, ep=ep)
            if rank == 0:
                log.info("Pseudo-to-Real: delinked shared layers at step %d; engine rebuilt", step)
        step_losses: dict[str, float] = {}
        step_tokens = 0
        for micro in range(t.grad_accum):
            objective, batch = batches.batch(step * t.grad_accum + micro)
            batch = {k: v.to(device, dtype=act_dtype if v.is_floating_point() else None) for k, v in batch.items()}
            out = engine(batch, objective)
            engine.backward(out["loss"])
            if own_clip and engine.is_gradient_accumulation_boundary():
                last_norm = clip_gradients(engine.module.model, t.grad_clip, ep_group if ep > 1 else None)
            engine.step()
            loss = float(out["loss"].detach())
            positions = int((batch["text"] != 0).sum()) + (batch["image"].shape[0] * model_cfg.num_image_tokens
                                                           if "image" in batch else 0)
            metrics.add(objective, loss, positions, int(out["tokens"]))
            step_losses[objective] = loss
            tokens_seen += positions
            step_tokens += positions
        losses_by_step.append({"step": step + 1, **step_losses})
        if first_loss is None:
            first_loss = step_losses
        if monitor is not None:
            monitor.step(step + 1, step_tokens)
        last = step + 1 == t.steps
        stop = preempt.agreed(device)
        if (step + 1) % t.log_every == 0 or last or stop:
            gn = last_norm if own_clip else grad_norm(engine)
            e = monitor.totals() if monitor is not None else None
            last_rec = metrics.flush(step, lr=sched.get_last_lr()[0], grad_norm=gn,
                                     moe=engine.module.model.moe_stats(), device=device,
                                     energy_j=(e["measured_j"], e["estimated_j"]) if e is not None else None)
            metrics.write()
            _write_losses(out_uri, rank, losses_by_step, start_step)
        if (step + 1) % t.save_every == 0 or last or stop:
            last_ckpt = _save(root, step + 1, tokens_seen, rank, engine, sched, batches, cfg, tok_json, world, ep_group,
                              t.keep_last)
        if stop:
            stopped_early = not last
            if rank == 0:
                log.warning("SIGTERM: checkpointed step %d and stopping", step + 1)
            break
    duration_s = time.monotonic() - t0
    energy_uri = None
    if monitor is not None:
        monitor.end("train")
        monitor.stop()
        if rank == 0:
            energy_uri = storage.join(out_uri, "energy.json")
            monitor.write(energy_uri)
        monitor.close()
    _write_losses(out_uri, rank, losses_by_step, start_step)
    summary = {
        "preset": cfg.preset, "world_size": world, "ep_size": ep, "zero_stage": t.zero_stage, "offload": t.offload,
        "steps": step + 1 if t.steps > start_step else start_step, "start_step": start_step, "stopped_early": stopped_early,
        "first_loss": first_loss, "last_loss": (last_rec or {}).get("loss"),
        "last_loss_by_objective": {k[5:]: v for k, v in (last_rec or {}).items() if k.startswith("loss_")},
        "tokens_seen": tokens_seen, "tokens_per_s": (last_rec or {}).get("tokens_per_s"),
        "mean_tokens_per_s": sum(r["tokens"] for r in metrics.lines if r["step"] > start_step) / max(1e-9, duration_s),
        "mfu": (last_rec or {}).get("mfu"), "peak_flops_source": peak_src, "duration_s": duration_s,
        "checkpoint": last_ckpt, "resumed_from": resumed_from, "energy": energy_uri,
        "metrics": storage.join(out_uri, "metrics.jsonl"), "p2r_delink_step": t.p2r_delink_step,
        "data_counts": dict(batches.counts),
        "offload_placement": (engine.optimizer.placement() if hasattr(engine.optimizer, "placement") else None),
        "offloaded_layers": sorted(getattr(engine.optimizer, "offload_layers", [])),
        "activation_checkpointed_blocks": engine.m6_checkpointed_blocks,
    }
    if rank == 0:
        storage.write_json(storage.join(out_uri, "train_summary.json"), summary)
    dist.barrier()
    return summary


def _save(root, step, tokens_seen, rank, engine, sched, batches, cfg, tok_json, world, ep_group, keep_last) -> str:
    """Every rank writes its state; barrier; rank 0 publishes COMPLETE and applies retention."""
    import torch.distributed as dist

    d = ckpt_mod.step_dir(root, step)
    model = engine.module.model
    full = ckpt_mod.consolidated_state(model, ep_group if cfg.train.ep_size > 1 else None, cfg.train.zero_stage)
    rank_state = {"step": step, "tokens_seen": tokens_seen, "model": engine.module.model.state_dict(),
                  "optimizer": engine.optimizer.state_dict(), "scheduler": sched.state_dict(),
                  "rng": ckpt_mod.rng_state(), "data": batches.state()}
    cfg_now = dataclasses.replace(cfg, model=model.cfg)
    meta = {"config": cfg_now.to_dict(), "step": step, "tokens_seen": tokens_seen, "world_size": world,
            "ep_size": cfg.train.ep_size, "zero_stage": cfg.train.zero_stage, "seed": cfg.train.seed,
            "data_position": {"rank0": {"epoch": batches.stream.epoch, "shard_cursor": batches.stream.cursor,
                                        "shard_offset": batches.stream.offset, "buffered": len(batches.stream.buffer),
                                        "samples": batches.stream.counts["samples"]}}}
    ckpt_mod.save(d, rank=rank, rank_state=rank_state, model_state=full if rank == 0 else None, meta=meta,
                  tokenizer_json=tok_json)
    dist.barrier()
    if rank == 0:
        ckpt_mod.publish(d, root, keep_last, step)
    dist.barrier()
    return d


def _restore(ckpt: str, rank: int, engine, sched, batches, world: int) -> tuple[int, int]:
    import torch.distributed as dist

    st = ckpt_mod.load_rank_state(ckpt, rank)
    engine.module.model.load_state_dict(st["model"])
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2: DeepSpeed's own partitioned state
        lst = [None] * dist.get_world_size(group=opt.dp_process_group)
        lst[dist.get_rank(group=opt.dp_process_group)] = st["optimizer"]
        opt.load_state_dict(lst, load_optimizer_states=True, load_from_fp32_weights=True)
    elif hasattr(opt, "fp32_partitioned_groups_flat"):
        raise UserError("resuming a ZeRO-3 run is not supported; train with --zero 0-2 to resume")
    else:
        opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    batches.load_state(st["data"])
    engine.global_steps = st["step"]
    return int(st["step"]), int(st["tokens_seen"]), st["rng"]


def _write_losses(out_uri: str, rank: int, rows: list[dict], start_step: int) -> None:
    """Per-step losses of this rank (what the resume and P2R checks compare)."""
    name = f"losses-rank{rank}-from{start_step:08d}.jsonl"
    storage.write_text(storage.join(out_uri, "losses", name), "".join(json.dumps(r) + "\n" for r in rows))


def _energy_monitor(cfg: Config, out_uri: str, rank: int, world: int, local_rank: int, flops: float):
    if not cfg.energy.enabled:
        return None
    from m6.energy.monitor import EnergyMonitor

    mon = EnergyMonitor(cfg.energy, run_id=storage.basename(out_uri) or "run", rank=rank, world_size=world,
                        local_rank=local_rank, flops_per_token=flops)
    mon.start()
    return mon


def _serve(monitor, registry, port: int) -> None:
    if monitor is not None:
        bound = monitor.serve_metrics(port)
    else:
        from prometheus_client import start_http_server

        start_http_server(port, registry=registry)
        bound = port
    log.info("serving Prometheus /metrics on port %d", bound)


def main(argv: list[str] | None = None) -> int:
    """Entry of each spawned rank: ``python -m m6.train.worker --config C --data D --out O [--resume auto]``."""
    import argparse

    from m6.config import from_dict

    p = argparse.ArgumentParser(prog="m6-train-worker")
    p.add_argument("--config", required=True, help="JSON file of the full Config")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", default=None)
    p.add_argument("--metrics-port", type=int, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with open(a.config, encoding="utf-8") as f:
        data = json.load(f)
    name = data.pop("preset", "custom")
    cfg = from_dict(Config, data)
    cfg.preset = name
    try:
        run(cfg, a.data, a.out, resume=a.resume, metrics_port=a.metrics_port)
    except UserError as e:
        print(f"m6: error: {e}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
