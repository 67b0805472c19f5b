"""`m6 energy report --run URI`: render a run's energy report (Markdown + power plot)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add ``energy`` with its ``report`` subcommand."""
    p = subparsers.add_parser("energy", help="energy and carbon of a run")
    sub = p.add_subparsers(dest="energy_command", required=True, metavar="ACTION")
    r = sub.add_parser("report", help="render energy_report.md and energy_power.png from a run's energy.json")
    r.add_argument("--run", required=True, help="run folder (local path or s3://) holding energy.json")
    r.add_argument("--out", default=None, help="where to write the report (default: the run folder)")
    r.add_argument("--prometheus", default=None, metavar="URL",
                   help="cross-check against DCGM/Kepler exporters scraped by this Prometheus")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    r.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from m6.cli import emit
    from m6.energy.report import render

    s = render(args.run, args.out, prometheus_url=args.prometheus)
    kind = "estimated" if s["estimated"] else "measured"
    stages = ", ".join(f"{k} {v:.4g} J" for k, v in sorted(s["stages"].items()))
    sources = ", ".join(f"{k} {v['energy_j']:.4g} J ({'estimated' if v['estimated'] else 'measured'})"
                        for k, v in sorted(s["by_source"].items()))
    jpt = "n/a" if s["j_per_token"] is None else f"{s['j_per_token']:.3g}"
    emit(args, s, f"energy of {s['run_id']}: {s['it_energy_j']:.6g} J IT ({kind}, {s['coverage_measured']:.0%} measured), "
                  f"{s['carbon_g']:.4g} gCO2e, {jpt} J/token\n  stages: {stages}\n  sources: {sources}\n"
                  f"  report: {s['report']}\n  plot: {s['plot']}")
    return 0
