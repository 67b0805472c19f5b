"""``m6 eval``: metrics, KFP metrics and the HTML report for a checkpoint; ``--gate`` decides promote or hold."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add ``m6 eval`` to the command's subparsers."""
    p = subparsers.add_parser("eval", help="evaluate a model on a held-out split (retrieval, captioning, LM, MoE health)",
                              description=__doc__)
    p.add_argument("--model", required=True, help="training run, checkpoints root or one checkpoint (URI)")
    p.add_argument("--data", required=True, help="curated dataset (URI with manifest.json)")
    p.add_argument("--out", required=True, help="where eval.json, metrics.json and report.html go (URI)")
    p.add_argument("--split", choices=("test", "val", "all"), default=None, help="default: the config's eval.split (test)")
    p.add_argument("--config", default=None, help="JSON/YAML config file; the keys of its 'eval' block override the checkpoint's")
    p.add_argument("--max-samples", type=int, default=None, help="cap on samples of the split")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--gate", action="store_true", help="decide promote/hold against thresholds and the champion")
    p.add_argument("--champion", default=None, help="the deployed model's eval.json, or the folder holding it")
    p.add_argument("--json", action="store_true", help="print one JSON object (metrics, and the decision with --gate)")
    p.set_defaults(func=_run)


def _eval_config(args: argparse.Namespace, loaded):
    from m6.config import EvalConfig, from_dict, load

    base = getattr(loaded[1], "eval", None) or EvalConfig()
    if args.config:
        # the whole file is validated; only the keys its eval block sets override the checkpoint's
        load(args.config, preset_name=getattr(loaded[1], "preset", None) or "tiny")
        base = from_dict(EvalConfig, _eval_block(args.config), "eval", base=base)
    overrides = {}
    if args.max_samples is not None:
        overrides["max_samples"] = args.max_samples
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    return from_dict(EvalConfig, overrides, "eval", base=base)


def _eval_block(path: str) -> dict:
    import json
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    return dict(data.get("eval") or {})


def _run(args: argparse.Namespace) -> int:
    from m6.cli import emit
    from m6.eval.run import load_checkpoint, evaluate, summarize

    loaded = load_checkpoint(args.model)
    cfg = _eval_config(args, loaded)
    doc = evaluate(args.model, args.data, args.out, cfg=cfg, split=args.split, gate=args.gate,
                   champion_uri=args.champion, loaded=loaded)
    summary, text = summarize(doc, args.out)
    emit(args, summary, text)
    return 0
