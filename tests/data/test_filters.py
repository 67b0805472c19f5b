"""Caption and image filters, each reason code; pHash index exactness; MinHash near-duplicates."""

from __future__ import annotations

import random

import pytest
from datakit import jpeg, png, small_cfg

from m6.data.dedup import Deduplicator, PHashIndex, minhash_values
from m6.data.filters import REASONS, check_caption, cjk_ratio, clean_text, process_image, text_hash


@pytest.mark.parametrize("raw,lang,reason", [
    ("   ", None, "caption_empty"),
    ("<p></p>", None, "caption_empty"),
    ("https://shop.example.com/item/1", None, "caption_url"),
    ("IMG_2041.JPG", None, "caption_filename"),
    ("DSC 1234", None, "caption_filename"),
    ("1234567", None, "caption_number"),
    ("COCO_train2014_000000503310", None, "caption_number"),
    ("a", None, "caption_too_short"),
    ("x" * 300, None, "caption_too_long"),
    ("cheap discount item shipped fast", "zh", "caption_low_cjk"),
    ("Buy Now!!! red cup", None, "caption_blocklisted"),
    ("免费领取 红色杯子", None, "caption_blocklisted"),
])
def test_bad_captions_are_dropped_with_their_reason(raw, lang, reason):
    text, _, got, _ = check_caption(raw, lang, small_cfg())
    assert text is None and got == reason and got in REASONS


def test_html_urls_and_boilerplate_are_stripped_and_the_caption_kept():
    raw = "<p><b>red &amp; blue cup</b></p> see https://x.example.com/a?b=1 — All rights reserved"
    text, lang, reason, changes = check_caption(raw, None, small_cfg())
    assert reason is None and text == "red & blue cup see"
    assert set(changes) == {"html_stripped", "url_stripped", "boilerplate_stripped"}
    assert lang == "en"


def test_caption_length_counts_a_cjk_character_as_one():
    cfg = small_cfg(min_caption_chars=3, max_caption_chars=5)
    assert check_caption("红色杯", "zh", cfg)[0] == "红色杯"           # 3 characters, 9 UTF-8 bytes
    assert check_caption("红色的大杯子", "zh", cfg)[2] == "caption_too_long"  # 6 characters
    assert check_caption("红色", "zh", cfg)[2] == "caption_too_short"


def test_chinese_caption_with_some_latin_passes_the_cjk_ratio():
    assert cjk_ratio("圣诞 抱枕 ins风") > 0.5
    text, lang, reason, _ = check_caption("圣诞 抱枕 ins风", None, small_cfg())
    assert reason is None and lang == "zh"


def test_clean_text_normalizes_whitespace_and_drops_invisible_characters():
    assert clean_text("  a \n\t b  ")[0] == "a b"
    assert clean_text("红色\u200b杯子\ufeff\x00") == ("红色杯子", ["control_chars_stripped"])


@pytest.mark.parametrize("data,reason", [
    (b"", "image_empty"),
    (b"<html>404</html>", "image_not_image"),
    (jpeg(size=(64, 48))[:300], "image_truncated"),
    (jpeg(size=(10, 10)), "image_too_small"),
    (jpeg(size=(200, 20)), "image_aspect_ratio"),
])
def test_bad_images_are_dropped_with_their_reason(data, reason):
    img, got = process_image(data, small_cfg(min_side=16))
    assert img is None and got == reason


def test_truncated_jpeg_body_is_detected():
    data = jpeg(size=(256, 256))
    img, reason = process_image(data[: len(data) // 2], small_cfg())
    assert img is None and reason == "image_truncated"


def test_too_few_pixels_is_its_own_reason():
    img, reason = process_image(jpeg(size=(20, 20)), small_cfg(min_side=16, min_pixels=500))
    assert reason == "image_too_few_pixels"


def test_images_are_resized_by_shorter_side_and_transparency_goes_on_white():
    from io import BytesIO

    from PIL import Image

    img, reason = process_image(jpeg(size=(400, 200)), small_cfg(image_size=32))
    assert reason is None and img.size == (64, 32) and img.orig_size == (400, 200)
    assert Image.open(BytesIO(img.data)).format == "JPEG"
    pimg, _ = process_image(png(), small_cfg(image_size=32, image_format="png"))
    rgb = Image.open(BytesIO(pimg.data))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)


def test_phash_index_finds_exactly_what_brute_force_finds():
    rng = random.Random(0)
    base = [rng.getrandbits(256) for _ in range(300)]
    idx = PHashIndex(max_bits=8)
    for h in base:
        idx.add(h)
    for _ in range(300):
        h = rng.choice(base)
        for _ in range(rng.randrange(0, 14)):
            h ^= 1 << rng.randrange(256)
        brute = any((h ^ b).bit_count() <= 8 for b in base)
        assert (idx.query(h) is not None) == brute


def test_reencoded_image_is_a_near_duplicate_and_a_different_one_is_not():
    cfg = small_cfg()
    a, _ = process_image(jpeg(shape=1, size=(96, 96), quality=95), cfg)
    b, _ = process_image(jpeg(shape=1, size=(96, 96), quality=70), cfg)
    c, _ = process_image(jpeg(shape=4, size=(96, 96), color=(20, 20, 200)), cfg)
    d = Deduplicator(cfg)
    assert d.check_image(a.pixel_hash, a.phash, a.color_sig) is None
    assert d.check_image(a.pixel_hash, a.phash, a.color_sig) == "dup_image_exact"
    assert d.check_image(b.pixel_hash, b.phash, b.color_sig) == "dup_image_near"
    assert d.check_image(c.pixel_hash, c.phash, c.color_sig) is None


def test_texts_dedup_exact_after_normalization_and_near_by_minhash():
    cfg = small_cfg(minhash_threshold=0.8)
    d = Deduplicator(cfg)
    doc = "A large red striped star on the left of a white background. It is made of soft cotton and ships in a box."
    near = doc.replace("soft cotton", "soft  cotton!").replace("box.", "box today.")
    other = "一个蓝色的圆环放在米色背景的中间，格子图案，小号。适合送礼，也适合自用。"
    assert d.check_text(text_hash(doc), minhash_values(doc, cfg.minhash_perm)) is None
    assert d.check_text(text_hash(doc.upper() + " "), minhash_values(doc, cfg.minhash_perm)) == "dup_text_exact"
    assert d.check_text(text_hash(near), minhash_values(near, cfg.minhash_perm)) == "dup_text_near"
    assert d.check_text(text_hash(other), minhash_values(other, cfg.minhash_perm)) is None


def test_phash256_matches_imagehash_reference():
    import imagehash
    from io import BytesIO

    from PIL import Image

    from m6.data.filters import phash256

    for i in range(12):
        im = Image.open(BytesIO(jpeg(shape=i, size=(64 + 8 * i, 64), color=(20 * i, 120, 255 - 20 * i)))).convert("RGB")
        ref = int("".join("1" if b else "0" for b in imagehash.phash(im, hash_size=16).hash.flatten()), 2)
        assert phash256(im) == ref


def test_exif_rotated_photo_is_turned_upright_before_resizing():
    from io import BytesIO

    from PIL import Image

    im = Image.new("RGB", (120, 60), (250, 250, 250))
    im.paste((200, 0, 0), (0, 0, 30, 60))  # red band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    buf = BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    img, reason = process_image(buf.getvalue(), small_cfg(image_size=32))
    assert reason is None and img.size == (32, 64)
    up = Image.open(BytesIO(img.data)).convert("RGB")
    assert up.getpixel((16, 2))[0] > 150 and up.getpixel((16, 60))[1] > 150  # red band now on top
