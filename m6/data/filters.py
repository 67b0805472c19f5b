"""Sample filters: caption cleaning and checks (CJK-aware), image decode/size checks, resize and encode once."""

from __future__ import annotations

import hashlib
import html
import io
import re
import unicodedata
from dataclasses import dataclass

from m6.config import DataConfig

# Reason codes (stats.json "dropped"): one per way a sample can be lost.
REASONS = {
    "record_malformed": "the source record could not be parsed (bad JSON, wrong columns)",
    "caption_not_utf8": "caption bytes are not valid UTF-8",
    "caption_missing": "no caption field at all",
    "caption_empty": "caption empty after cleaning",
    "caption_filename": "caption is just a file name",
    "caption_number": "caption is just a number or an id",
    "caption_url": "caption was only a URL",
    "caption_too_short": "caption shorter than min_caption_chars (CJK characters count one each)",
    "caption_too_long": "caption longer than max_caption_chars",
    "caption_low_cjk": "a zh caption whose share of CJK characters is below min_cjk_ratio",
    "caption_blocklisted": "caption contains a blocklisted phrase",
    "image_missing": "the caption names an image file that does not exist",
    "image_empty": "zero-byte image file",
    "image_not_image": "the bytes are not an image format PIL knows",
    "image_truncated": "the image file ends early",
    "image_corrupt": "the image data does not decode",
    "image_too_small": "shorter side below min_side",
    "image_too_few_pixels": "fewer than min_pixels pixels",
    "image_aspect_ratio": "aspect ratio above max_aspect_ratio",
    "tar_truncated": "a tar shard ends in the middle of a member",
    "dup_image_exact": "same decoded pixels as a kept sample",
    "dup_image_near": "perceptual hash within phash_hamming bits of a kept image",
    "dup_text_exact": "same normalized text as a kept text-only sample",
    "dup_text_near": "MinHash-estimated Jaccard similarity above minhash_threshold with a kept text",
}

_TAG = re.compile(r"<[^>]{0,400}>")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.I)
_WS = re.compile(r"\s+")
_FILENAME = re.compile(r"^[\w\-. ()]{0,120}\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|mp4|pdf)$", re.I)
_NUMBER = re.compile(r"^[\s\d#_\-.,:/+()]*\d[\s\d#_\-.,:/+()]*$")
_ID_LIKE = re.compile(r"^(?:img|dsc|image|photo|pic|screenshot)[\s_\-]?\d+$", re.I)
_ID_TOKEN = re.compile(r"^[A-Za-z_\-#]*\d[\w\-#]*$")  # one token carrying an id, e.g. COCO_train2014_000000503310
# Boilerplate that shops and CMSs leave in alt texts; removed, not a reason to drop.
_BOILERPLATE = re.compile(
    r"(?:all rights reserved|©\s*\d{4}[^.。]*|copyright\s+\d{4}[^.。]*|stock photo|image may contain:?|"
    r"free shipping|包邮|正品保证|图片来源[:：]?\S*)", re.I)


def is_cjk(ch: str) -> bool:
    """CJK ideographs (unified, extensions A/B, compatibility), kana and hangul."""
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2A6DF or 0xF900 <= o <= 0xFAFF
            or 0x3040 <= o <= 0x30FF or 0xAC00 <= o <= 0xD7AF)


def cjk_ratio(text: str) -> float:
    """Share of CJK characters among non-space, non-punctuation characters."""
    chars = [c for c in text if not c.isspace() and not unicodedata.category(c).startswith("P")]
    return sum(map(is_cjk, chars)) / len(chars) if chars else 0.0


def guess_lang(text: str) -> str:
    """``"zh"`` when at least 30% of the letters are CJK, else ``"en"``."""
    return "zh" if cjk_ratio(text) >= 0.3 else "en"


def clean_text(text: str) -> tuple[str, list[str]]:
    """NFC-normalize and strip HTML, URLs and boilerplate; returns the text and what was changed."""
    changes = []
    t = unicodedata.normalize("NFC", text)
    if "<" in t or "&" in t:
        u = html.unescape(_TAG.sub(" ", t))
        if u != t:
            changes.append("html_stripped")
            t = u
    u = _URL.sub(" ", t)
    if u != t:
        changes.append("url_stripped")
        t = u
    u = _BOILERPLATE.sub(" ", t)
    if u != t:
        changes.append("boilerplate_stripped")
        t = u
    if any(unicodedata.category(c) in ("Cc", "Cf") and not c.isspace() for c in t):
        # NULs, zero-width spaces, BOMs and bidi marks from scraped pages: invisible, but they split tokens.
        t = "".join(c for c in t if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf"))
        changes.append("control_chars_stripped")
    t = _WS.sub(" ", t).strip(" \t\r\n|-–—·•,;")
    return t, changes


def normalize_for_hash(text: str) -> str:
    """Case-, width- and punctuation-insensitive form used for exact text duplicates."""
    t = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in t if not c.isspace() and not unicodedata.category(c).startswith("P"))


def text_hash(text: str) -> str:
    """128-bit BLAKE2b of :func:`normalize_for_hash` (hex): the key for exact text duplicates."""
    return hashlib.blake2b(normalize_for_hash(text).encode("utf-8"), digest_size=16).hexdigest()


def check_caption(raw: str, lang: str | None, cfg: DataConfig, *, max_chars: int | None = None,
                  min_chars: int | None = None) -> tuple[str | None, str, str | None, list[str]]:
    """Clean and check one caption.

    Returns:
        ``(text, lang, reason, changes)``: ``text`` is None and ``reason`` a code from
        :data:`REASONS` when the caption is dropped.
    """
    had_url = bool(_URL.search(raw))
    text, changes = clean_text(raw)
    lang = lang or guess_lang(text)
    if not text:
        return None, lang, ("caption_url" if had_url else "caption_empty"), changes
    low = text.lower()
    if _FILENAME.match(text) or _ID_LIKE.match(text):
        return None, lang, "caption_filename", changes
    if _NUMBER.match(text) or (_ID_TOKEN.match(text) and sum(c.isdigit() for c in text) >= 4):
        return None, lang, "caption_number", changes
    n = len(text)  # code points: one CJK character counts one, like one latin letter
    if n < (cfg.min_caption_chars if min_chars is None else min_chars):
        return None, lang, "caption_too_short", changes
    if n > (cfg.max_caption_chars if max_chars is None else max_chars):
        return None, lang, "caption_too_long", changes
    if lang == "zh" and cjk_ratio(text) < cfg.min_cjk_ratio:
        return None, lang, "caption_low_cjk", changes
    if any(b.lower() in low for b in cfg.blocklist):
        return None, lang, "caption_blocklisted", changes
    return text, lang, None, changes


# --------------------------------------------------------------------------- images


@dataclass
class ProcessedImage:
    """A decoded, checked, resized and re-encoded image with the hashes deduplication needs."""

    data: bytes
    ext: str
    orig_size: tuple[int, int]
    size: tuple[int, int]
    pixel_hash: str
    phash: int
    color_sig: bytes
    """4×4 RGB thumbnail (48 bytes): pHash sees only luminance, so colour is checked separately."""


def process_image(data: bytes, cfg: DataConfig) -> tuple[ProcessedImage | None, str | None]:
    """Decode, check, resize (shorter side to ``cfg.image_size``) and encode an image once.

    JPEGs are decoded in draft mode: libjpeg scales by 1/2, 1/4 or 1/8 inside the IDCT, so a
    large photo never gets decoded at full resolution (the final resize to the exact size is bicubic).
    Camera photos are turned upright by their EXIF orientation before resizing.

    Returns:
        ``(image, None)`` or ``(None, reason)``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        return None, "image_empty"
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return None, "image_truncated" if _looks_truncated(data) else "image_not_image"
    except Exception:
        return None, "image_truncated" if _looks_truncated(data) else "image_corrupt"
    orig = im.size
    w, h = orig
    if min(w, h) < cfg.min_side:
        return None, "image_too_small"
    if w * h < cfg.min_pixels:
        return None, "image_too_few_pixels"
    if max(w, h) / max(1, min(w, h)) > cfg.max_aspect_ratio:
        return None, "image_aspect_ratio"
    target = cfg.image_size
    scale = target / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    try:
        if im.format == "JPEG" and scale < 1:
            im.draft("RGB", new)
        im.load()
    except OSError as e:
        return None, ("image_truncated" if "truncated" in str(e).lower() or _looks_truncated(data) else "image_corrupt")
    except Exception:
        return None, "image_truncated" if _looks_truncated(data) else "image_corrupt"
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if im.format in ("JPEG", "WEBP", "PNG") else 1
        if orientation in (5, 6, 7, 8):  # rotated by 90°: the upright image has the other aspect
            new = (new[1], new[0])
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        if im.mode != "RGB":
            im = _to_rgb(im)
        if im.size != new:
            im = im.resize(new, Image.BICUBIC, reducing_gap=None)
        pixel_hash = hashlib.blake2b(im.tobytes(), digest_size=16).hexdigest()
        ph = phash256(im)
        sig = im.resize((4, 4), Image.BOX).tobytes()
        buf = io.BytesIO()
        if cfg.image_format == "png":
            im.save(buf, format="PNG", optimize=False)
        else:
            im.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    except Exception:
        return None, "image_corrupt"
    return ProcessedImage(buf.getvalue(), cfg.image_format, orig, im.size, pixel_hash, ph, sig), None


def _looks_truncated(data: bytes) -> bool:
    """A JPEG without its end-of-image marker or a PNG without its IEND chunk: the file was cut."""
    if data[:3] == b"\xff\xd8\xff":
        return b"\xff\xd9" not in data[-16:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-16:]
    return False


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))  # transparent product shots sit on white
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


PHASH_BITS = 256
_EXIF_ORIENTATION = 0x0112


_DCT_ROWS = None


def _dct_rows():
    """The 16 lowest-frequency rows of the unnormalised DCT-II matrix on 64 points (scipy.fftpack's convention)."""
    global _DCT_ROWS
    if _DCT_ROWS is None:
        import numpy as np

        k = np.arange(16)[:, None]
        n = np.arange(64)[None, :]
        _DCT_ROWS = 2.0 * np.cos(np.pi * k * (2 * n + 1) / 128.0)
    return _DCT_ROWS


def phash256(im) -> int:
    """256-bit DCT perceptual hash as an int: ``imagehash.phash(im, hash_size=16)``'s algorithm.

    The common 64-bit pHash puts different simple product shots (same silhouette, other
    pattern) within 4 bits of each other; 16×16 DCT coefficients keep them tens of bits
    apart while re-encodes and small brightness changes stay within a few bits. Only the
    16×16 low-frequency block is needed, so two small matrix products replace the full
    64×64 2-D DCT that imagehash computes (tests check parity on images without exact ties).
    """
    import numpy as np
    from PIL import Image

    x = np.asarray(im.convert("L").resize((64, 64), Image.LANCZOS), dtype=np.float64)
    c = _dct_rows()
    # Rounding removes float noise in coefficients that are zero in exact arithmetic (flat
    # images): without it their bits would depend on summation order.
    low = np.round(c @ x @ c.T, 3)
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")
