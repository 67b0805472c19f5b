"""The built-in demo corpus: product-like shape images with English/Chinese captions, and realistic dirt.

Every image shows one object whose attributes (kind, colour, pattern, size, position,
background) are drawn at random and described by several caption phrasings, so a small
model can learn retrieval, captioning and text-to-image in minutes on a CPU. Some
(kind, colour) combinations are held out (``"heldout": true``) to test generalisation.
A set share of items is dirtied the way scraped data is: corrupt, truncated and empty
files, exact and near duplicates, empty, junk and mis-encoded captions.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tempfile
from pathlib import Path

from m6 import storage

log = logging.getLogger(__name__)

# (english, chinese) names; index order is part of the held-out rule below.
KINDS = [("circle", "圆形"), ("square", "方块"), ("triangle", "三角形"), ("star", "星形"),
         ("heart", "心形"), ("diamond", "菱形"), ("cross", "十字"), ("ring", "圆环")]
COLORS = [("red", "红色", (214, 40, 40)), ("green", "绿色", (40, 160, 60)), ("blue", "蓝色", (40, 80, 210)),
          ("yellow", "黄色", (235, 200, 30)), ("purple", "紫色", (130, 50, 170)), ("orange", "橙色", (245, 130, 20)),
          ("pink", "粉色", (240, 120, 180)), ("black", "黑色", (25, 25, 25))]
PATTERNS = [("solid", "纯色"), ("striped", "条纹"), ("dotted", "波点"), ("checkered", "格子")]
SIZES = [("small", "小"), ("large", "大")]
POSITIONS = [("center", "中间", "in the center"), ("left", "左边", "on the left"), ("right", "右边", "on the right"),
             ("top", "上方", "at the top"), ("bottom", "下方", "at the bottom")]
BACKGROUNDS = [("white", "白色", (250, 250, 250)), ("gray", "灰色", (150, 150, 150)),
               ("beige", "米色", (235, 220, 190)), ("light blue", "浅蓝色", (190, 215, 240))]

IMAGE_DIRT = ("corrupt", "truncated", "zero_byte", "not_image", "missing_file", "tiny", "extreme_aspect",
              "exact_dup", "near_dup")
CAPTION_DIRT = ("empty_caption", "filename_caption", "number_caption", "url_caption", "blocklisted",
                "html_caption", "non_utf8", "malformed_json", "no_caption_key", "zh_not_chinese")
TEXT_DIRT = ("exact_dup", "near_dup", "html", "empty", "blocklisted", "number")


def is_heldout(kind: int, color: int) -> bool:
    """One colour per kind (and one kind per colour) is never seen in training: 8 of 64 combinations."""
    return (kind * 3 + color) % 8 == 5


def _draw_attrs(rng: random.Random) -> dict:
    k, c = rng.randrange(len(KINDS)), rng.randrange(len(COLORS))
    # Held-out combinations are rarer than the rest (~5% of items) so they stay a test set.
    while is_heldout(k, c) and rng.random() < 0.6:
        k, c = rng.randrange(len(KINDS)), rng.randrange(len(COLORS))
    bg = rng.randrange(len(BACKGROUNDS))
    return {"kind": k, "color": c, "pattern": rng.randrange(len(PATTERNS)), "size": rng.randrange(len(SIZES)),
            "position": rng.randrange(len(POSITIONS)), "background": bg}


def attr_names(a: dict) -> dict:
    """Attribute indices → English names (what goes into each sample's json)."""
    return {"kind": KINDS[a["kind"]][0], "color": COLORS[a["color"]][0], "pattern": PATTERNS[a["pattern"]][0],
            "size": SIZES[a["size"]][0], "position": POSITIONS[a["position"]][0],
            "background": BACKGROUNDS[a["background"]][0]}


def _shape_mask(kind: str, box: tuple[int, int, int, int], size: tuple[int, int]):
    from PIL import Image, ImageDraw

    m = Image.new("L", size, 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if kind == "circle":
        d.ellipse(box, fill=255)
    elif kind == "square":
        d.rectangle(box, fill=255)
    elif kind == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif kind == "diamond":
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif kind == "cross":
        d.rectangle((x0 + w * 0.35, y0, x1 - w * 0.35, y1), fill=255)
        d.rectangle((x0, y0 + h * 0.35, x1, y1 - h * 0.35), fill=255)
    elif kind == "ring":
        d.ellipse(box, fill=255)
        d.ellipse((x0 + w * 0.28, y0 + h * 0.28, x1 - w * 0.28, y1 - h * 0.28), fill=0)
    elif kind == "star":
        import math

        pts = []
        for i in range(10):
            r = (w / 2) if i % 2 == 0 else (w / 5)
            ang = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + r * math.cos(ang), cy + r * math.sin(ang)))
        d.polygon(pts, fill=255)
    elif kind == "heart":
        d.ellipse((x0, y0, cx + w * 0.05, cy + h * 0.05), fill=255)
        d.ellipse((cx - w * 0.05, y0, x1, cy + h * 0.05), fill=255)
        d.polygon([(x0 + w * 0.03, cy - h * 0.05), (x1 - w * 0.03, cy - h * 0.05), (cx, y1)], fill=255)
    return m


def _fill(pattern: str, rgb: tuple[int, int, int], size: tuple[int, int], step: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, rgb)
    if pattern == "solid":
        return img
    light = tuple(min(255, v + 110) for v in rgb) if sum(rgb) < 500 else tuple(max(0, v - 110) for v in rgb)
    d = ImageDraw.Draw(img)
    w, h = size
    if pattern == "striped":
        for x in range(-h, w, step * 2):
            d.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=light)
    elif pattern == "dotted":
        r = max(1, step // 3)
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                d.ellipse((x - r, y - r, x + r, y + r), fill=light)
    elif pattern == "checkered":
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    d.rectangle((x, y, x + step - 1, y + step - 1), fill=light)
    return img


def render(a: dict, rng: random.Random, size: tuple[int, int] | None = None):
    """Draw the object described by attribute indices ``a`` (a PIL image)."""
    from PIL import Image

    w, h = size or (rng.randint(72, 112), rng.randint(72, 112))
    m = min(w, h)
    obj = int(m * (0.32 if a["size"] == 0 else 0.62) * rng.uniform(0.92, 1.08))
    pos = POSITIONS[a["position"]][0]
    cx, cy = w / 2, h / 2
    off_x, off_y = (w - obj) / 2 - 2, (h - obj) / 2 - 2
    cx += {"left": -off_x, "right": off_x}.get(pos, 0) + rng.uniform(-2, 2)
    cy += {"top": -off_y, "bottom": off_y}.get(pos, 0) + rng.uniform(-2, 2)
    box = (int(cx - obj / 2), int(cy - obj / 2), int(cx + obj / 2), int(cy + obj / 2))
    bg = BACKGROUNDS[a["background"]][2]
    img = Image.new("RGB", (w, h), tuple(max(0, min(255, v + rng.randint(-8, 8))) for v in bg))
    fill = _fill(PATTERNS[a["pattern"]][0], COLORS[a["color"]][2], (w, h), max(3, obj // 5))
    img.paste(fill, (0, 0), _shape_mask(KINDS[a["kind"]][0], box, (w, h)))
    return img


def captions_for(a: dict, lang: str, rng: random.Random, n: int = 2) -> list[str]:
    """``n`` distinct phrasings of the attributes in English or Chinese."""
    kind_en, kind_zh = KINDS[a["kind"]]
    col_en, col_zh, _ = COLORS[a["color"]]
    pat_en, pat_zh = PATTERNS[a["pattern"]]
    size_en, size_zh = SIZES[a["size"]]
    pos_en, pos_zh, pos_phrase = POSITIONS[a["position"]]
    bg_en, bg_zh, _ = BACKGROUNDS[a["background"]]
    pat_adj = {"solid": "plain", "striped": "striped", "dotted": "polka-dot", "checkered": "checkered"}[pat_en]
    if lang == "zh":
        forms = [f"{bg_zh}背景上{pos_zh}的一个{size_zh}{col_zh}{pat_zh}{kind_zh}",
                 f"{col_zh}{pat_zh}{kind_zh}，{size_zh}号，位于{pos_zh}，{bg_zh}背景",
                 f"{pos_zh}有一个{col_zh}的{size_zh}{kind_zh}，{pat_zh}图案，{bg_zh}底色",
                 f"商品图：{size_zh}号{col_zh}{kind_zh}，{pat_zh}款式"]
    else:
        forms = [f"a {size_en} {col_en} {pat_adj} {kind_en} {pos_phrase} on a {bg_en} background",
                 f"{col_en} {kind_en} with a {pat_en} pattern, {size_en}, {pos_phrase}",
                 f"{pat_adj} {col_en} {kind_en}, {size_en} size, {bg_en} backdrop, placed {pos_phrase}",
                 f"product photo of a {size_en} {pat_adj} {kind_en} in {col_en}"]
    return rng.sample(forms, k=min(n, len(forms)))


def document_for(a: dict, lang: str, rng: random.Random) -> str:
    """A short product description (a text-only training document) built from attributes."""
    sents = captions_for(a, lang, rng, n=3)
    if lang == "zh":
        return "。".join(sents) + "。"
    return ". ".join(s[0].upper() + s[1:] for s in sents) + "."


def _encode(img, fmt: str, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=quality)
    return buf.getvalue()


def _dirty_image(kind: str, clean: bytes, rng: random.Random, a: dict) -> bytes | None:
    """Bytes for an image-side dirt kind (None: no file is written at all)."""
    from PIL import Image, ImageEnhance

    if kind == "corrupt":  # a complete JPEG whose Huffman table was overwritten: identifies, fails to decode
        b = bytearray(clean if clean[:2] == b"\xff\xd8" else _encode(render(a, rng), "jpg"))
        k = b.find(b"\xff\xc4")
        b[k + 4:k + 40] = bytes(rng.randrange(256) for _ in range(36))
        return bytes(b)
    if kind == "truncated":
        return clean[: int(len(clean) * rng.uniform(0.3, 0.7))]
    if kind == "zero_byte":
        return b""
    if kind == "not_image":
        return b"<html><body>404 Not Found</body></html>\n"
    if kind == "missing_file":
        return None
    if kind == "tiny":
        return _encode(render(a, rng, size=(10, 10)), "jpg")
    if kind == "extreme_aspect":
        return _encode(render(a, rng, size=(400, 40)), "jpg")
    if kind == "near_dup":  # the same picture re-encoded a little brighter at lower quality
        img = Image.open(io.BytesIO(clean)).convert("RGB")
        return _encode(ImageEnhance.Brightness(img).enhance(1.04), "jpg", quality=80)
    raise ValueError(kind)


def _dirty_caption(kind: str, rec: dict, rng: random.Random) -> tuple[dict | None, bytes | None]:
    """A record (or a raw line) carrying a caption-side dirt kind."""
    caps = rec["captions"]
    if kind == "empty_caption":
        rec["captions"] = ["   "]
    elif kind == "filename_caption":
        rec["captions"] = [f"IMG_{rng.randint(1000, 9999)}.JPG"]
    elif kind == "number_caption":
        rec["captions"] = [str(rng.randint(10**5, 10**8))]
    elif kind == "url_caption":
        rec["captions"] = [f"https://shop.example.com/item/{rng.randint(1, 10**6)}"]
    elif kind == "blocklisted":
        rec["captions"] = ["buy now!!! " + caps[0]]
    elif kind == "html_caption":  # survives: cleaning strips the markup and the caption is kept
        rec["captions"] = [f"<p><b>{caps[0]}</b></p> <a href='https://shop.example.com'>link</a>"] + caps[1:]
    elif kind == "zh_not_chinese":
        rec["lang"] = "zh"
        rec["captions"] = ["cheap discount item shipped fast"]
    elif kind == "no_caption_key":
        del rec["captions"]
    elif kind == "non_utf8":  # a legacy exporter wrote the line in GBK (Chinese) or Latin-1 (English)
        zh = rec.get("lang") == "zh"
        rec["captions"] = [caps[0] if zh else caps[0] + " from the café"]
        return None, json.dumps(rec, ensure_ascii=False).encode("gbk" if zh else "latin-1", errors="replace")
    elif kind == "malformed_json":
        return None, json.dumps(rec, ensure_ascii=False).encode("utf-8")[:-7]
    else:
        raise ValueError(kind)
    return rec, None


def _text_docs(n: int, langs: list[str], rng: random.Random, dirt_rate: float, dirt: dict) -> list[str]:
    lines: list[str] = []
    clean: list[str] = []  # duplicates copy clean documents, as reposts of a real listing would
    for i in range(n):
        a = _draw_attrs(rng)
        lang = rng.choice(langs)
        doc = document_for(a, lang, rng)
        rec = {"id": f"doc{i:06d}", "text": doc, "lang": lang}
        if clean and rng.random() < dirt_rate:
            kind = rng.choice(TEXT_DIRT)
            dirt[rec["id"]] = "text_" + kind
            if kind == "exact_dup":
                prev = json.loads(rng.choice(clean))
                rec["text"], rec["lang"] = prev["text"], prev["lang"]
            elif kind == "near_dup":
                prev = json.loads(rng.choice(clean))
                # The same listing reposted with a short tag line: a near duplicate, not an exact one.
                rec["text"] = prev["text"] + (" Ships today." if prev["lang"] == "en" else "今日发货。")
                rec["lang"] = prev["lang"]
            elif kind == "html":
                rec["text"] = f"<div>{doc}</div> see https://shop.example.com/p/{i}"
            elif kind == "empty":
                rec["text"] = ""
            elif kind == "blocklisted":
                rec["text"] = "click here " + doc
            elif kind == "number":
                rec["text"] = str(rng.randint(10**6, 10**9))
        else:
            clean.append(json.dumps(rec, ensure_ascii=False))
        lines.append(json.dumps(rec, ensure_ascii=False))
    return lines


def synthesize(out_uri: str, n: int = 2000, seed: int = 0, langs: list[str] | tuple[str, ...] = ("en", "zh"),
               *, n_text: int | None = None, dirt_rate: float = 0.08) -> dict:
    """Write the demo corpus: ``images/``, ``captions.jsonl``, ``texts.jsonl`` and ``synth.json``.

    Args:
        out_uri: a local folder or ``s3://`` prefix.
        n: image-caption items (dirty ones included).
        seed: the whole corpus is a function of the seed.
        langs: caption languages, each item picks one (``en``, ``zh``).
        n_text: text-only documents (default ``n // 4``).
        dirt_rate: share of items made dirty, in [0, 1).

    Returns:
        The summary also written to ``synth.json`` (counts, dirt per kind, held-out items).
    """
    langs = list(langs)
    bad = [x for x in langs if x not in ("en", "zh")]
    if bad or not langs:
        raise ValueError(f"--lang: unknown language(s) {bad or langs}; choose from en, zh")
    if not 0 <= dirt_rate < 1:
        raise ValueError(f"dirt_rate must be in [0, 1), got {dirt_rate}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n_text = n // 4 if n_text is None else n_text
    rng = random.Random(seed)
    dirt: dict[str, str] = {}
    heldout = 0
    clean_pool: list[tuple[str, dict]] = []  # (image name, record) of clean items, for duplicates
    with tempfile.TemporaryDirectory(prefix="m6-synth-") as tmp:
        root = Path(out_uri) if not storage.is_s3(out_uri) else Path(tmp)
        (root / "images").mkdir(parents=True, exist_ok=True)
        cap_lines: list[bytes] = []
        for i in range(n):
            a = _draw_attrs(rng)
            lang = rng.choice(langs)
            fmt = "png" if rng.random() < 0.1 else "jpg"
            name = f"images/{i:06d}.{fmt}"
            img = render(a, rng)
            data: bytes | None = _encode(img, fmt)
            ho = is_heldout(a["kind"], a["color"])
            rec = {"image": name, "captions": captions_for(a, lang, rng, n=rng.choice((2, 3))), "lang": lang,
                   "attributes": attr_names(a), "heldout": ho}
            raw_line = None
            if clean_pool and rng.random() < dirt_rate:
                kind = rng.choice(IMAGE_DIRT + CAPTION_DIRT)
                dirt[name] = kind
                if kind == "exact_dup":
                    src_name, src_rec = rng.choice(clean_pool)
                    data = (root / src_name).read_bytes()
                    rec = {**src_rec, "image": name}
                elif kind == "near_dup":
                    src_name, src_rec = rng.choice(clean_pool)
                    data = _dirty_image(kind, (root / src_name).read_bytes(), rng, a)
                    rec = {**src_rec, "image": name}
                    name = name.replace(".png", ".jpg")
                    rec["image"] = name
                elif kind in IMAGE_DIRT:
                    data = _dirty_image(kind, data, rng, a)
                else:
                    rec, raw_line = _dirty_caption(kind, rec, rng)
            else:
                clean_pool.append((name, rec))
            heldout += int(bool(rec and rec.get("heldout")))
            if data is not None:
                (root / name).write_bytes(data)
            cap_lines.append(raw_line if raw_line is not None else json.dumps(rec, ensure_ascii=False).encode("utf-8"))
        (root / "captions.jsonl").write_bytes(b"\n".join(cap_lines) + b"\n")
        texts = _text_docs(n_text, langs, rng, dirt_rate, dirt)
        (root / "texts.jsonl").write_text("\n".join(texts) + "\n", encoding="utf-8")
        kinds: dict[str, int] = {}
        for k in dirt.values():
            kinds[k] = kinds.get(k, 0) + 1
        summary = {"out": out_uri, "items": n, "text_docs": n_text, "seed": seed, "langs": langs,
                   "dirt_rate": dirt_rate, "dirty_items": len(dirt), "dirt_by_kind": dict(sorted(kinds.items())),
                   "heldout_items": heldout, "dirt": dirt}
        (root / "synth.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1), encoding="utf-8")
        if storage.is_s3(out_uri):
            storage.upload_dir(root, out_uri)
    log.info("synthesized %d items + %d documents (%d dirty) into %s", n, n_text, len(dirt), out_uri)
    return {k: v for k, v in summary.items() if k != "dirt"}
