"""`m6 data synth` and `m6 curate`: the demo corpus and the curation job from the command line."""

from __future__ import annotations

import argparse

from m6.errors import UserError


def _synth(args: argparse.Namespace) -> int:
    from m6.cli import emit
    from m6.data.synth import synthesize

    try:
        s = synthesize(args.out, n=args.n, seed=args.seed, langs=[x.strip() for x in args.lang.split(",") if x.strip()],
                       n_text=args.n_text, dirt_rate=args.dirt_rate)
    except ValueError as e:
        raise UserError(f"data synth: {e}") from None
    emit(args, s, f"synthesized {s['items']} image-caption items + {s['text_docs']} documents into {s['out']} "
                  f"({s['dirty_items']} dirty, {s['heldout_items']} held-out)")
    return 0


def _curate(args: argparse.Namespace) -> int:
    from m6 import config
    from m6.cli import emit
    from m6.data.curate import curate

    overrides: dict = {}
    if args.workers is not None:
        overrides["workers"] = args.workers
    cfg = config.load(args.config, preset_name=args.preset, overrides={"data": overrides} if overrides else None)
    stats = curate(args.input, args.output, cfg.data, fmt=args.format)
    top = sorted(((r, n) for r, n in stats["dropped"].items() if n), key=lambda x: -x[1])[:6]
    human = (f"curated {stats['read']} samples → kept {stats['kept']} in {stats['shards']} shards at {args.output}\n"
             f"  dropped {stats['dropped_total']}: " + ", ".join(f"{r} {n}" for r, n in top) + "\n"
             f"  split {stats['split']}; {stats['samples_per_s']} samples/s; tokenizer {stats['tokenizer_vocab_size']} "
             f"tokens; report {args.output.rstrip('/')}/report.html")
    emit(args, {k: v for k, v in stats.items() if k not in ("histograms", "reasons")}, human)
    return 0


def register(sub) -> None:
    """Add ``data synth`` and ``curate`` to the ``m6`` command."""
    data = sub.add_parser("data", help="datasets: the built-in demo corpus")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    s = dsub.add_parser("synth", help="write the synthetic demo corpus (images + en/zh captions, with dirt)")
    s.add_argument("--out", required=True, help="output folder or s3:// prefix")
    s.add_argument("--n", type=int, default=2000, help="image-caption items (default 2000)")
    s.add_argument("--n-text", type=int, default=None, help="text-only documents (default n/4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--lang", default="en,zh", help="caption languages, comma-separated (en, zh)")
    s.add_argument("--dirt-rate", type=float, default=0.08, help="share of dirty items (default 0.08)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_synth)

    c = sub.add_parser("curate", help="raw image-text sources → curated WebDataset shards")
    c.add_argument("--input", action="append", required=True, help="source folder/file or s3:// prefix (repeatable)")
    c.add_argument("--output", required=True, help="dataset folder or s3:// prefix")
    c.add_argument("--config", default=None, help="JSON/YAML config file (its data: section is used)")
    c.add_argument("--preset", default=None, help="start from this preset's data config (default: the file's, or tiny)")
    c.add_argument("--format", default=None, help="force the source format: imagefolder|wds|parquet|muge|text")
    c.add_argument("--workers", type=int, default=None, help="worker processes (default: config data.workers)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=_curate)
