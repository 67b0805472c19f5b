"""``m6 train`` and ``m6 plan``."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from m6.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="pretrain a model with DeepSpeed (local processes or a Kubeflow TrainJob)")
    t.add_argument("--preset", default="tiny", help="named preset (tiny, demo, base, m6-10b, …)")
    t.add_argument("--config", help="JSON/YAML config file applied over the preset")
    t.add_argument("--config-json", help=argparse.SUPPRESS)  # the full config, as a TrainJob passes it
    t.add_argument("--data", required=True, help="curated dataset URI (local path or s3://)")
    t.add_argument("--out", required=True, help="run output URI: checkpoints, metrics, energy")
    t.add_argument("--nproc", type=int, default=1, help="local processes (gloo on the CPU, NCCL on GPUs)")
    t.add_argument("--ep", type=int, help="expert-parallel size")
    t.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage")
    t.add_argument("--offload", help="none | optimizer | granular:FRACTION | granular:0,1,5")
    t.add_argument("--steps", type=int)
    t.add_argument("--micro-batch", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--save-every", type=int)
    t.add_argument("--keep-last", type=int)
    t.add_argument("--log-every", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--activation-checkpointing", action="store_true", default=None)
    t.add_argument("--resume", choices=("auto",), help="continue from the newest complete checkpoint under --out")
    t.add_argument("--p2r-delink-step", type=int, help="Pseudo-to-Real: train shared layers, delink at this step")
    t.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on PORT+rank (default: env M6_METRICS_PORT)")
    t.add_argument("--no-energy", action="store_true", help="do not measure energy")
    t.add_argument("--submit", action="store_true", help="run as a Kubeflow Trainer TrainJob instead of locally")
    t.add_argument("--dry-run", action="store_true", help="with --submit: print the TrainJob, do not create it")
    t.add_argument("--image", default="ghcr.io/m6/m6:latest", help="container image for --submit")
    t.add_argument("--nodes", type=int, default=1, help="nodes for --submit")
    t.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node for --submit")
    t.add_argument("--namespace", default="default")
    t.add_argument("--name", help="TrainJob name (default derived from --out)")
    t.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one rank inside a TrainJob pod
    t.add_argument("--json", action="store_true", help="print one JSON summary object")
    t.set_defaults(func=_train)

    p = sub.add_parser("plan", help="will a preset fit a cluster, how long will it take, how much energy")
    p.add_argument("--preset", default="base")
    p.add_argument("--config", help="JSON/YAML config file applied over the preset (e.g. a custom model)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem", default="80GB", help="memory per GPU, e.g. 32GB")
    p.add_argument("--gpu", default="a100", help="v100 | a100 | h100 | h200")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpu-mem-per-node", default="1TB")
    p.add_argument("--interconnect", default="ib-hdr", help="ethernet-25g | ethernet-100g | ib-hdr | ib-ndr | nvlink")
    p.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 450e9")
    p.add_argument("--mfu", type=float, default=0.4, help="achieved model FLOPs utilisation (0-1)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plan)


def _config(args: argparse.Namespace):
    from m6.config import Config, from_dict, load

    if getattr(args, "config_json", None):
        data = json.loads(args.config_json)
        name = data.pop("preset", args.preset)
        cfg = from_dict(Config, data)
        cfg.preset = name
        return cfg
    return load(args.config, preset_name=args.preset)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from m6.cli import emit
    from m6.config import from_dict

    cfg = _config(args)
    over: dict[str, Any] = {}
    for flag, key in (("ep", "ep_size"), ("zero", "zero_stage"), ("offload", "offload"), ("steps", "steps"),
                      ("micro_batch", "micro_batch_size"), ("grad_accum", "grad_accum"), ("lr", "lr"),
                      ("save_every", "save_every"), ("keep_last", "keep_last"), ("log_every", "log_every"),
                      ("seed", "seed"), ("p2r_delink_step", "p2r_delink_step"),
                      ("activation_checkpointing", "activation_checkpointing")):
        v = getattr(args, flag)
        if v is not None:
            over[key] = v
    train_cfg = from_dict(type(cfg.train), over, "train", base=cfg.train)
    cfg = dataclasses.replace(cfg, train=train_cfg)
    if args.no_energy:
        cfg.energy = dataclasses.replace(cfg.energy, enabled=False)
    if train_cfg.p2r_delink_step is not None and not 0 < train_cfg.p2r_delink_step < train_cfg.steps:
        raise UserError(f"--p2r-delink-step must be in (0, {train_cfg.steps}), got {train_cfg.p2r_delink_step}")
    port = args.metrics_port if args.metrics_port is not None else (
        int(os.environ["M6_METRICS_PORT"]) if os.environ.get("M6_METRICS_PORT") else None)
    if args.worker:
        from m6.train.worker import run

        run(cfg, args.data, args.out, resume=args.resume, metrics_port=port)
        return 0
    if args.submit:
        from m6.train.launch import submit_trainjob

        name = args.name or ("m6-train-" + args.out.rstrip("/").rsplit("/", 1)[-1]).lower().replace("_", "-")[:60]
        res = submit_trainjob(cfg, args.data, args.out, name=name, image=args.image, nodes=args.nodes,
                              gpus_per_node=args.gpus_per_node, namespace=args.namespace, dry_run=args.dry_run)
        human = json.dumps(res["trainjob"], indent=2) if args.dry_run else f"TrainJob {name}: {res.get('status')}"
        emit(args, res, human)
        return 0
    from m6.train.launch import train

    s = train(cfg, args.data, args.out, nproc=args.nproc, resume=args.resume, metrics_port=port)
    by_obj = ", ".join(f"{k} {v:.3f}" for k, v in (s.get("last_loss_by_objective") or {}).items())
    first = s.get("first_loss") or {}
    human = (f"trained {cfg.preset} for {s['steps']} steps on {s['world_size']} process(es) "
             f"(EP {s['ep_size']}, ZeRO-{s['zero_stage']}, offload {s['offload']})\n"
             f"  loss: first {_fmt(first)} → last {s['last_loss']:.4f} ({by_obj})\n"
             f"  throughput: {s['mean_tokens_per_s']:.0f} tokens/s, MFU {100 * (s['mfu'] or 0):.2f}%\n"
             f"  checkpoint: {s['checkpoint']}\n  metrics: {s['metrics']}\n  energy: {s['energy']}")
    emit(args, {**s, "first_loss_mean": _mean(first)}, human)
    return 0


def _mean(d: dict) -> float | None:
    return sum(d.values()) / len(d) if d else None


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in d.items()) or "-"


def _plan(args: argparse.Namespace) -> int:
    from m6.cli import emit
    from m6.train.plan import Cluster, parse_size, plan

    cfg = _config(args)
    try:
        cluster = Cluster(gpus=args.gpus, gpu_mem_bytes=parse_size(args.gpu_mem), gpus_per_node=args.gpus_per_node,
                          cpu_mem_per_node_bytes=parse_size(args.cpu_mem_per_node), gpu=args.gpu,
                          interconnect=args.interconnect, pue=cfg.energy.pue)
    except ValueError as e:
        raise UserError(str(e)) from None
    r = plan(cfg.model, cluster, tokens=args.tokens, micro_batch=args.micro_batch, mfu=args.mfu, precision=args.precision)
    p = r["params"]
    head = (f"{cfg.preset}: {p['total'] / 1e9:.2f} B parameters ({p['active'] / 1e9:.2f} B active per token) "
            f"on {args.gpus} × {args.gpu} {args.gpu_mem}")
    if r["best"] is None:
        human = f"{head}\n  does not fit: {r['advice']}"
    else:
        b = r["best"]
        mem = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in b["gpu_bytes"].items())
        human = (f"{head}\n  fits with ZeRO-{b['zero_stage']}, EP {b['ep_size']}, offload {b['offload']}, "
                 f"activation checkpointing {'on' if b['activation_checkpointing'] else 'off'}\n"
                 f"  per GPU: {b['gpu_total_bytes'] / 2**30:.1f} GiB ({mem} GiB); host {b['cpu_bytes_per_node'] / 2**30:.0f} GiB/node\n"
                 f"  {args.tokens:.3g} tokens: {b['days']:.1f} days at {100 * args.mfu:.0f}% MFU, "
                 f"{b['energy_kwh'] / 1000:.1f} MWh"
                 + ("\n  warning: communication exceeds compute per step; expect lower MFU" if r.get("comm_bound") else ""))
    emit(args, r, human)
    return 0
