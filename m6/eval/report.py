"""The evaluation report: one self-contained HTML page with metrics, the gate decision, plots and examples."""

from __future__ import annotations

import base64
import html
import io
import math

from m6.eval.data import EvalSet, thumbnail_b64


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recall_plot(retrieval: dict) -> str:
    """Recall@K for K = 1.. in both directions, each with its exact random-ranking floor (dotted)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for (d, label), color in zip((("t2i", "text → image"), ("i2t", "image → text")), ("tab:blue", "tab:orange")):
        curve = retrieval[d].get("curve") or []
        ax.plot(range(1, len(curve) + 1), curve, marker=".", color=color, label=label)
        chance = retrieval[d].get("chance_curve") or []
        ax.plot(range(1, len(chance) + 1), chance, ":", color=color, label=f"{label}, random ranking")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def expert_heatmap(moe: list[dict]) -> str:
    """Share of routed tokens per expert (columns) for each MoE layer (rows)."""
    import numpy as np

    plt = _pyplot()
    shares = np.array([lay["load_share"] for lay in moe])
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * shares.shape[1] + 2), max(2, 0.5 * shares.shape[0] + 1.2)))
    im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(moe)), [str(lay["layer"]) for lay in moe])
    if shares.shape[1] <= 16:  # few experts: print each share in its cell
        for (li, e), v in np.ndenumerate(shares):
            ax.text(e, li, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < shares.max() / 2 else "k")
    fig.colorbar(im, ax=ax, label="share of routed tokens (uniform = 1/E)")
    return _png(fig)


def loss_plot(rows: list[dict]) -> str | None:
    """Training loss curves (every ``loss*`` series of the run's ``metrics.jsonl``) against step."""
    plt = _pyplot()
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)):
            continue
        for k, v in _flatten(row).items():
            if "loss" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                series.setdefault(k, []).append((step, v))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _metrics_table(doc: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v['value'])}</td><td>{html.escape(v['split'])}</td>"
                   f"<td>{v['samples']}</td></tr>" for k, v in doc["metrics"].items())
    return f"<table><tr><th>metric</th><th>value</th><th>split</th><th>samples</th></tr>{rows}</table>"


def _gate(doc: dict) -> str:
    g = doc.get("gate")
    if not g:
        return ""
    color = "#1a7f37" if g["decision"] == "promote" else "#b35900"
    checks = "".join(f"<tr><td>{c['check']}</td><td>{html.escape(c['metric'])}</td><td>{_fmt(c.get('value'))}</td>"
                     f"<td>{_fmt(c.get('bound', c.get('champion')))}</td><td>{'✓' if c['passed'] else '✗'}</td></tr>"
                     for c in g["checks"])
    champ = f"<p>champion: {html.escape(str(g.get('champion_eval', '')))}</p>" if g.get("champion_eval") else ""
    return (f"<h2>Gate: <span style='color:{color}'>{g['decision'].upper()}</span></h2><p>{html.escape(g['reason'])}</p>"
            f"{champ}"
            f"<table><tr><th>check</th><th>metric</th><th>candidate</th><th>bound / champion</th><th>ok</th></tr>"
            f"{checks}</table>")


def _examples(doc: dict, es: EvalSet) -> str:
    parts = []
    caps = doc["examples"]["captions"]
    if caps:
        parts.append("<h3>Image → generated caption vs references</h3><table>")
        for ex in caps:
            refs = "<br>".join(html.escape(r) for r in ex["references"])
            parts.append(f"<tr><td><img src='data:image/png;base64,{thumbnail_b64(es.images[ex['image']])}'></td>"
                         f"<td><b>{html.escape(ex['prediction']) or '<i>(empty)</i>'}</b></td><td>{refs}</td></tr>")
        parts.append("</table>")
    queries = doc["examples"]["queries"]
    if queries:
        parts.append("<h3>Text query → top images (green border: a ground-truth match)</h3><table>")
        for q in queries:
            thumbs = "".join(
                f"<img style='border:3px solid {'#1a7f37' if i in q['relevant'] else '#ddd'}' "
                f"src='data:image/png;base64,{thumbnail_b64(es.images[i], 64)}'>" for i in q["top_images"])
            parts.append(f"<tr><td>{html.escape(q['text'])}</td><td>{thumbs}</td></tr>")
        parts.append("</table>")
    return "".join(parts)


def render_html(doc: dict, es: EvalSet, train_rows: list[dict]) -> str:
    """The whole report page; every image is embedded as base64 so the file stands alone."""
    data = doc["data"]
    sections = [
        f"<h1>Evaluation of {html.escape(doc['model']['checkpoint'])}</h1>",
        f"<p>data <code>{html.escape(data['uri'])}</code>, split <b>{html.escape(data['split'])}</b>: "
        f"{data['samples']} samples ({data['images']} images, {data['texts']} captions, {data['documents']} documents); "
        f"dropped: {html.escape(str(data['dropped'] or 'none'))}. Held-out check: "
        f"{data['overlap_check'].get('train_samples_admitted')} training-split samples admitted, "
        f"{data['overlap_check'].get('excluded_key_hash_train', 0)} excluded "
        f"(split method: {html.escape(str(data['overlap_check'].get('method')))}).</p>",
        _gate(doc),
        "<h2>Metrics</h2>", _metrics_table(doc),
        "<p>Text-to-image metrics: not measured (this model has no image-generation head yet).</p>",
    ]
    if doc.get("retrieval"):
        r = doc["retrieval"]
        sections += ["<h2>Retrieval</h2>",
                     f"<p>mean recall {r['mean_recall']:.4f} vs {r['chance']['mean_recall']:.4f} for random ranking "
                     f"(lift {r['mean_recall_lift']:.2f}×); MUGE MR {r['muge_mr']:.4f}. Definitions follow "
                     "Flickr30K/COCO (a query hits when any of its matches is in the top K; mean recall averages "
                     "R@1/5/10 of both directions) and MUGE (MR = mean of text→image R@1/5/10, the column where "
                     "Chinese-CLIP RN50 zero-shot reports 63.0 on the full MUGE validation set). Ties count at "
                     "their expected value under a random order.</p>", recall_plot(r)]
    if doc.get("moe"):
        moe_rows = "".join(f"<tr><td>{m['layer']}</td><td>{m['load_cv']:.3f}</td><td>{m['drop_rate']:.4f}</td>"
                           f"<td>{m['router_entropy']:.3f} / {m['router_entropy_max']:.3f}</td></tr>" for m in doc["moe"])
        sections += ["<h2>MoE health</h2>",
                     "<p>Routing of every token in the held-out perplexity passes, summed per layer.</p>",
                     expert_heatmap(doc["moe"]),
                     "<table><tr><th>layer</th><th>load CV</th><th>drop rate</th><th>router entropy / max (nats)</th>"
                     f"</tr>{moe_rows}</table>"]
    loss = loss_plot(train_rows)
    sections += ["<h2>Training loss</h2>", loss or "<p>no training metrics.jsonl found beside the model.</p>"]
    sections += ["<h2>Examples</h2>", _examples(doc, es)]
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}img{margin:2px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>m6 eval</title><style>{style}</style></head>"
            f"<body>{''.join(sections)}</body></html>")
