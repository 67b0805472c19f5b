"""The energy report: Markdown with per-device/rank/node/stage figures, carbon, comparisons, and a power plot."""

from __future__ import annotations

import io
import logging

from m6 import storage
from m6.energy.carbon import J_PER_KWH, m6_claims
from m6.errors import UserError

log = logging.getLogger(__name__)

REPORT_MD = "energy_report.md"
REPORT_PNG = "energy_power.png"


def _j(x: float | None) -> str:
    """Joules with a readable unit, full precision kept in energy.json."""
    if x is None:
        return "n/a"
    for unit, scale in (("MWh", 3.6e9), ("kWh", 3.6e6), ("kJ", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:,.3f} {unit}"
    return f"{x:,.3f} J"


def _g(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x / 1e6:,.3f} t" if abs(x) >= 1e6 else f"{x / 1e3:,.3f} kg" if abs(x) >= 1e3 else f"{x:,.4f} g"


def _num(x: float | None, fmt: str = "{:.3g}") -> str:
    return "n/a" if x is None else fmt.format(x)


def load_document(run_uri: str) -> dict:
    """The energy.json of a run folder (or the file itself).

    Raises:
        UserError: no energy.json there, or it is not an m6 energy document.
    """
    uri = run_uri if run_uri.endswith(".json") else storage.join(run_uri, "energy.json")
    if not storage.exists(uri):
        raise UserError(f"{uri}: no energy.json (was the run made with energy tracking on?)")
    doc = storage.read_json(uri)
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("m6.energy/"):
        raise UserError(f"{uri}: not an m6 energy document (schema {doc.get('schema') if isinstance(doc, dict) else None!r})")
    return doc


def markdown(doc: dict, png_name: str | None = REPORT_PNG) -> str:
    """The report text for an energy.json document."""
    t, c = doc["totals"], doc["carbon"]
    kind = ("not measured (energy tracking was disabled)" if doc.get("disabled") else "measured"
            if not t["estimated"] else "estimated" if not t["measured"] else "partly estimated")
    lines = [
        f"# Energy report: run `{doc['run_id']}`",
        "",
        f"Started {doc['started_at']}, {doc['duration_s']:.1f} s, {doc['world_size']} rank(s) on "
        f"{len(doc['nodes'])} node(s). The figure is **{kind}**: {t['coverage_measured']:.0%} of the energy comes "
        f"from sensors, the rest from stated assumptions.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| IT energy | {_j(t['it_energy_j'])} ({t['it_energy_j']:.6g} J) |",
        f"| uncertainty band | {_j(t['energy_low_j'])} – {_j(t['energy_high_j'])} |",
        f"| facility energy (× PUE {c['pue']:g}) | {_j(t['facility_energy_j'])} |",
        f"| carbon ({c['gco2_per_kwh']:g} gCO2e/kWh, {c['region']}) | {_g(t['carbon_g'])} "
        f"(band {_g(t['carbon_low_g'])} – {_g(t['carbon_high_g'])}) |",
        f"| measured / estimated | {_j(t['measured_j'])} / {_j(t['estimated_j'])} |",
        f"| tokens | {t['tokens']:,} in {t['steps']:,} steps |",
        f"| J per token | {_num(t['j_per_token'])} |",
        f"| tokens per kWh | {_num(t['tokens_per_kwh'], '{:,.0f}')} |",
        f"| J per FLOP | {_num(t['j_per_flop'])} ({_num(t['flops'])} training FLOPs) |",
        f"| tracker overhead | {doc['overhead']['sampler_cpu_s']:.3f} CPU-s of the sampler thread |",
        "",
        f"Grid intensity source: {c['source']}",
        "",
        "## By stage",
        "",
        "| stage | energy | measured | estimated | time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, s in sorted(doc["stages"].items(), key=lambda kv: -kv[1]["energy_j"]):
        lines.append(f"| {name} | {_j(s['energy_j'])} | {_j(s['measured_j'])} | {_j(s['estimated_j'])} | "
                     f"{s['duration_s']:.1f} |")
    lines += ["", "## By device", "", "| rank | node | device | source | kind | energy | ± |", "|---|---|---|---|---|---|---|"]
    for d in doc["devices"]:
        k = "estimated" if d["estimated"] else "integrated power" if d["integrated"] else "measured counter"
        lines.append(f"| {d['rank']} | {d['node']} | {d['device']} | {d['source']} | {k} | {_j(d['energy_j'])} | "
                     f"{d['uncertainty_rel']:.0%} |")
    lines += ["", "By rank: " + ", ".join(f"rank {r}: {_j(j)}" for r, j in sorted(doc["by_rank"].items())),
              "", "By node: " + ", ".join(f"{n}: {_j(j)}" for n, j in sorted(doc["by_node"].items())),
              "", "By source: " + ", ".join(f"{s}: {_j(v['energy_j'])}" for s, v in sorted(doc["by_source"].items()))]
    assumptions = [f"- {d['device']} (rank {d['rank']}): {d['assumption']}" for d in doc["devices"] if d.get("assumption")]
    assumptions += [f"- {d['device']}: {d['uncertainty_basis']}" for d in doc["devices"]]
    lines += ["", "## Assumptions and uncertainty", "",
              "The band is the sum over devices of each figure times its source's relative uncertainty "
              "(errors taken as fully correlated, the conservative choice).", "", *dict.fromkeys(assumptions)]
    if doc["unavailable"]:
        lines += ["", "Sensors not available (their energy is covered by an estimate, never reported as zero):", ""]
        lines += [f"- rank {u['rank']} {u['sensor']}: {u['reason']}" for u in doc["unavailable"]]
    if doc["cross_checks"]:
        lines += ["", "## Cross-checks", "", "| rank | device | ours | check | difference |", "|---|---|---|---|---|"]
        for x in doc["cross_checks"]:
            diff = "n/a" if x["diff_rel"] is None else f"{x['diff_rel']:+.2%}"
            lines.append(f"| {x['rank']} | {x['device']} | {x['reference_source']} {_j(x['reference_j'])} | "
                         f"{x['source']} {_j(x['energy_j'])} | {diff} |")
    ext = doc.get("external_cross_checks") or []
    if ext:
        lines += ["", "## Exporter cross-checks (PromQL)", "", "| exporter | ours | exporter | difference |",
                  "|---|---|---|---|"]
        for x in ext:
            if "error" in x:
                lines.append(f"| {x['source']} | {_j(x.get('ours_j'))} | unavailable: {x['error']} | n/a |")
            else:
                diff = "n/a" if x["diff_rel"] is None else f"{x['diff_rel']:+.2%}"
                lines.append(f"| {x['source']} | {_j(x['ours_j'])} | {_j(x['energy_j'])} | {diff} |")
    lines += ["", "## Compared with published training runs", "",
              "Facility energy of this run against Patterson et al. 2021 (arXiv 2104.10350); a ratio below 1 means "
              "this run spent less energy per unit of work.", "",
              "| model | energy | tCO2e | J/FLOP | J/token | this run per FLOP | this run per token |",
              "|---|---|---|---|---|---|---|"]
    for r in doc["comparisons"]:
        lines.append(f"| {r['model']} | {r['energy_mwh']:,.1f} MWh | {r['co2e_t']:g} | {r['j_per_flop']:.3g} | "
                     f"{_num(r['j_per_token'])} | {_num(r['run_vs_ref_per_flop'], '{:.3g}×')} | "
                     f"{_num(r['run_vs_ref_per_token'], '{:.3g}×')} |")
    lines += ["", "What M6's energy claims imply:", ""]
    for cl in m6_claims():
        mwh = f"{cl['implied_mwh']:,.1f} MWh — " if cl["implied_mwh"] is not None else ""
        lines.append(f"- {cl['claim']}: {mwh}{cl['basis']}")
    if png_name:
        lines += ["", "## Power over time", "", f"![power over time]({png_name})"]
    return "\n".join(lines) + "\n"


def plot_png(doc: dict) -> bytes:
    """A stacked power-over-time plot (mean W per bin, per rank and device), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bin_s = doc["power"]["bin_s"]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    series = {k: v for k, v in doc["power"]["series"].items()
              if any(d["key"] == k.split("/", 1)[1] and d["counted"] for d in doc["devices"])}
    if series:
        n = max(len(v) for v in series.values())
        # Bin edges; the last bin ends at the run's end, and each series repeats its last value there.
        xs = [i * bin_s for i in range(n)] + [min(n * bin_s, max(doc["duration_s"], (n - 1) * bin_s + 1e-3))]
        ys = [(v + [0.0] * (n - len(v)))[:n] + [(v + [0.0] * (n - len(v)))[n - 1]] for v in series.values()]
        ax.stackplot(xs, ys, labels=list(series), step="post", alpha=0.85)
        ax.set_xlim(0, xs[-1])
        ax.legend(loc="upper center", fontsize=7)
    labels: list[list] = []  # [x, text]: windows starting within 3 % of the axis of each other share one label
    span_s = max(ax.get_xlim()[1], 1e-9)
    for w in sorted((w for w in doc["windows"] if w.get("rank", 0) == 0), key=lambda w: w["t0_s"]):
        ax.axvspan(w["t0_s"], w["t1_s"], alpha=0.06, color="k")
        if labels and w["t0_s"] - labels[-1][0] < 0.03 * span_s:
            labels[-1][1] += f", {w['stage']}"
        else:
            labels.append([w["t0_s"], w["stage"]])
    for x, text in labels:
        ax.text(x, ax.get_ylim()[1] * 0.97, f" {text}", fontsize=7, va="top", ha="left", rotation=90)
    t = doc["totals"]
    ax.set_title(f"{doc['run_id']}: {t['it_energy_j']:.4g} J IT energy "
                 f"({'estimated' if t['estimated'] else 'measured'}; {t['coverage_measured']:.0%} measured)", fontsize=9)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("power (W)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render(run_uri: str, out_uri: str | None = None, prometheus_url: str | None = None) -> dict:
    """Write ``energy_report.md`` and ``energy_power.png`` for a run; returns their URIs and the headline figures.

    Args:
        run_uri: the run folder holding energy.json (local or s3://), or the energy.json itself.
        out_uri: where to write the report (default: beside energy.json).
        prometheus_url: query DCGM/Kepler exporters there for the run's span and add the cross-check.
    """
    doc = load_document(run_uri)
    if prometheus_url:
        from m6.energy.prom import cross_check

        doc["external_cross_checks"] = cross_check(doc, prometheus_url)
    folder = out_uri or (run_uri.rsplit("/", 1)[0] if run_uri.endswith(".json") else run_uri)
    md_uri, png_uri = storage.join(folder, REPORT_MD), storage.join(folder, REPORT_PNG)
    storage.write_bytes(png_uri, plot_png(doc))
    storage.write_text(md_uri, markdown(doc))
    t = doc["totals"]
    return {"report": md_uri, "plot": png_uri, "run_id": doc["run_id"], "it_energy_j": t["it_energy_j"],
            "facility_energy_j": t["facility_energy_j"], "kwh": t["it_energy_j"] / J_PER_KWH,
            "carbon_g": t["carbon_g"], "j_per_token": t["j_per_token"], "coverage_measured": t["coverage_measured"],
            "estimated": t["estimated"], "external_cross_checks": doc.get("external_cross_checks", []),
            "stages": {k: v["energy_j"] for k, v in doc["stages"].items()},
            "by_source": {k: {"energy_j": v["energy_j"], "estimated": v["estimated"]}
                          for k, v in doc["by_source"].items()}}
