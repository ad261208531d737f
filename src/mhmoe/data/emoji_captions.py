"""images/captions/ of the data pack from its source packages (`mhmoe data prepare multimodal`), byte for byte:

emoji_captions.jsonl.gz (PyPI emoji 2.16.0, `emoji/unicode_codes/emoji*.json`): the fully-qualified emoji of
    emoji.json (status 2) without a skin-tone modifier (U+1F3FB-U+1F3FF), in the file's order, that the font draws
    as one glyph; one JSON object per emoji, {"index", "char", "captions": {en, de, fr, es, ja, zh, ru}}, each
    caption the package's name with the colons removed and "_" made " " (`caption_records`).
emoji_32.npz (Debian fonts-noto-color-emoji 2.042-0+deb12u1, NotoColorEmoji.ttf): each emoji drawn with Pillow
    (raqm layout, which shapes a sequence into the font's one glyph) at the font's bitmap size, 109 px, cropped to
    its visible pixels, centred on a transparent square (the odd pixel left / top), resized to 32x32 (Lanczos,
    on the RGBA picture) and put on white (`emoji_picture`); key "images", uint8 (N, 32, 32, 3), in a zip whose one
    member images.npy is deflated at level 9 with a fixed date (`npz_bytes`). An emoji that draws nothing has no
    glyph in the font; one whose advance is more than 1.5 glyphs' is drawn as several (`render_emoji`).
The pack was made with Pillow 13.0.0 (FreeType 2.14.3, raqm 0.11.0); the Lanczos filter and the rasteriser are
Pillow's, so another Pillow may differ in a pixel, which the sha256 check then reports.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mhmoe.data.builders import gzip_bytes

CAPTION_LANGUAGES = ("en", "de", "fr", "es", "ja", "zh", "ru")
FULLY_QUALIFIED = 2  # the emoji package's status code
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
BITMAP_SIZE = 109  # the strike of Noto Color Emoji's CBDT bitmaps
ONE_GLYPH = "\U0001f600"  # a reference glyph for the advance of one emoji
FONT_FILE = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


def emoji_names(sdist: Path) -> dict[str, dict[str, Any]]:
    """{language: that file's JSON} of `emoji/unicode_codes/emoji*.json` in the emoji sdist ("en": emoji.json)."""
    names = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            found = re.fullmatch(r"[^/]+/emoji/unicode_codes/emoji(?:_([a-z]+))?\.json", member.name)
            data = archive.extractfile(member) if found and member.isfile() else None
            if found and data is not None:
                names[found.group(1) or "en"] = json.loads(data.read().decode("utf-8"))
    missing = [lang for lang in CAPTION_LANGUAGES if lang not in names]
    if missing:
        raise ValueError(f"{sdist.name} has no emoji name files for {missing}")
    return names


def candidates(names: dict[str, dict[str, Any]]) -> list[str]:
    """The fully-qualified emoji without a skin tone, in emoji.json's order."""
    return [e for e, v in names["en"].items() if v["status"] == FULLY_QUALIFIED and not SKIN_TONES & set(e)]


def caption_records(names: dict[str, dict[str, Any]], chars: list[str]) -> list[dict]:
    """One record per emoji drawn: {"index", "char", "captions"}."""

    def caption(name: str | None) -> str | None:
        return name.strip(":").replace("_", " ") if name else name

    records = []
    for index, char in enumerate(chars):
        captions = {"en": caption(names["en"][char]["en"])}
        captions.update({lang: caption(names[lang].get(char)) for lang in CAPTION_LANGUAGES[1:]})
        records.append({"index": index, "char": char, "captions": captions})
    return records


def emoji_picture(drawn: Any) -> np.ndarray:
    """A drawn emoji (a Pillow RGBA image) as the pack's (32, 32, 3) uint8 picture (module doc)."""
    from PIL import Image

    box = drawn.getchannel("A").getbbox()
    if box is None:
        raise ValueError("nothing visible to crop")
    cropped = drawn.crop(box)
    w, h = cropped.size
    side = max(w, h)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(cropped, ((side - w) // 2, (side - h) // 2))
    small = square.resize((32, 32), Image.Resampling.LANCZOS)
    white = Image.new("RGBA", (32, 32), (255, 255, 255, 255))
    white.alpha_composite(small)
    return np.asarray(white.convert("RGB"))


def render_emoji(font: Any, chars: list[str], one_glyph: str = ONE_GLYPH) -> tuple[list[str], np.ndarray, dict]:
    """(the emoji drawn as one glyph, their pictures (N, 32, 32, 3), {reason: count} of those left out) with a
    Pillow FreeTypeFont; `one_glyph` gives the advance of one glyph."""
    from PIL import Image, ImageDraw

    one = font.getlength(one_glyph)
    kept, pictures, left_out = [], [], {"no glyph in this font": 0, "not a single glyph in this font": 0}
    for char in chars:
        left, top, right, bottom = font.getbbox(char)
        drawn = Image.new("RGBA", (right - left + 2, bottom - top + 2), (0, 0, 0, 0))
        ImageDraw.Draw(drawn).text((1 - left, 1 - top), char, font=font, embedded_color=True)
        if drawn.getchannel("A").getbbox() is None:
            left_out["no glyph in this font"] += 1
        elif font.getlength(char) > 1.5 * one:
            left_out["not a single glyph in this font"] += 1
        else:
            kept.append(char)
            pictures.append(emoji_picture(drawn))
    images = np.stack(pictures) if pictures else np.zeros((0, 32, 32, 3), np.uint8)
    return kept, images, left_out


def npz_bytes(name: str, array: np.ndarray) -> bytes:
    """An .npz of one array whose bytes depend only on the array: deflate level 9, the zip's earliest date."""
    npy = io.BytesIO()
    np.lib.format.write_array(npy, np.ascontiguousarray(array), allow_pickle=False)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        archive.writestr(info, npy.getvalue(), compresslevel=9)
    return out.getvalue()


def caption_files(sdist: Path, font_root: Path) -> dict[str, bytes]:
    """{path: bytes} of images/captions/ from the emoji sdist and an unpacked fonts-noto-color-emoji."""
    from PIL import ImageFont

    names = emoji_names(sdist)
    font = ImageFont.truetype(str(font_root / FONT_FILE), BITMAP_SIZE, layout_engine=ImageFont.Layout.RAQM)
    chars, images, _ = render_emoji(font, candidates(names))
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in caption_records(names, chars))
    return {
        "images/captions/emoji_32.npz": npz_bytes("images", images),
        "images/captions/emoji_captions.jsonl.gz": gzip_bytes(jsonl.encode("utf-8")),
    }
