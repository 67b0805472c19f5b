"""The curation report: kept and dropped thumbnails per reason, histograms of image sizes and caption lengths."""

from __future__ import annotations

import base64
import html
import io

from m6 import storage


def _hist_png(stats: dict) -> bytes:
    """Three histograms (shorter side, caption length, document length) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = stats["histograms"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.17, top=0.9, wspace=0.25)
    for ax, (key, title, xlabel) in zip(axes, [("side_px", "kept images: original shorter side", "pixels"),
                                               ("caption_chars", "kept captions: length", "characters"),
                                               ("text_chars", "kept documents: length", "characters")]):
        xs = [int(b) for b in h[key]]
        ws = list(h[key].values())
        if xs:
            ax.hist(xs, weights=ws, bins=min(40, max(5, len(xs))), color="#4a7ab5")
        else:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("samples")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _dropped_png(stats: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(((r, n) for r, n in stats["dropped"].items() if n), key=lambda x: -x[1])
    fig, ax = plt.subplots(figsize=(8, 0.3 * max(3, len(items)) + 0.8))
    fig.subplots_adjust(left=0.3, right=0.97, bottom=0.12, top=0.9)
    if items:
        ax.barh([r for r, _ in items][::-1], [n for _, n in items][::-1], color="#c0504d")
    ax.set_xlabel("samples dropped")
    ax.set_title(f"read {stats['read']}, kept {stats['kept']}, dropped {stats['dropped_total']}", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _cell(ex: dict) -> str:
    img = (f'<img src="data:image/jpeg;base64,{ex["thumb"]}" alt="">' if ex.get("thumb")
           else '<div class="noimg">no image</div>')
    return (f'<figure>{img}<figcaption><code>{html.escape(ex["key"])}</code><br>'
            f'{html.escape(ex.get("text") or "∅")}</figcaption></figure>')


def render_html(stats: dict, examples: dict[str, list[dict]], kept_examples: list[dict], hist_png: bytes) -> str:
    """The self-contained HTML report (images inlined as data URIs)."""
    def b64(png: bytes) -> str:
        return base64.b64encode(png).decode("ascii")

    rows = "".join(f"<tr><td><code>{r}</td><td>{n}</td><td>{html.escape(stats['reasons'].get(r, ''))}</td></tr>"
                   for r, n in stats["dropped"].items() if n)
    sections = [f"<h3>kept ({stats['kept']})</h3><div class=grid>{''.join(map(_cell, kept_examples))}</div>"]
    for reason, exs in sorted(examples.items(), key=lambda x: -stats["dropped"].get(x[0], 0)):
        sections.append(f"<h3>dropped: <code>{reason}</code> ({stats['dropped'].get(reason, 0)})</h3>"
                        f"<div class=grid>{''.join(map(_cell, exs))}</div>")
    inputs = "".join(f"<li><code>{html.escape(i['input'])}</code> ({', '.join(i['formats'])}): read {i['read']}, "
                     f"kept {i['kept']}</li>" for i in stats["by_input"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>m6 curation report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} .grid{{display:flex;flex-wrap:wrap;gap:8px}}
figure{{margin:0;width:150px;font-size:11px}} figure img,.noimg{{width:96px;height:96px;object-fit:contain;
background:#eee;display:block}} .noimg{{line-height:96px;text-align:center;color:#888}}
table{{border-collapse:collapse}} td{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>
<h1>Curation report</h1>
<p>read <b>{stats['read']}</b> · kept <b>{stats['kept']}</b> · dropped <b>{stats['dropped_total']}</b> ·
{stats['shards']} shards · split {stats['split']} · {stats['samples_per_s']} samples/s with {stats['workers']} workers</p>
<ul>{inputs}</ul>
<h2>Dropped per reason</h2><table>{rows}</table>
<p><img src="data:image/png;base64,{b64(_dropped_png(stats))}" alt="drops"></p>
<p>Cleaned (kept, text changed): {html.escape(str(stats['modified']))}</p>
<h2>Distributions</h2><p><img src="data:image/png;base64,{b64(hist_png)}" alt="histograms"></p>
<h2>Examples</h2>{''.join(sections)}
</body></html>"""


def write_report(output: str, stats: dict, examples: dict[str, list[dict]], kept_by_part: dict[int, list[dict]]) -> str:
    """Write ``report.html`` (and ``report_hist.png``) into the dataset; returns the report's URI."""
    kept = [ex for i in sorted(kept_by_part) for ex in kept_by_part[i]][:24]
    uri = storage.join(output, "report.html")
    hist = _hist_png(stats)
    storage.write_text(uri, render_html(stats, examples, kept, hist))
    storage.write_bytes(storage.join(output, "report_hist.png"), hist)
    return uri
