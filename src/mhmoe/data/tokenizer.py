"""Tokenizers: a dependency-free byte tokenizer and a byte-level BPE wrapper around HF `tokenizers`.

Both expose the same small surface the trainer needs: `encode`, `encode_batch`, `decode`, `vocab_size`,
`eos_id`, `name`, `save` and `fingerprint` (a sha256 of the definition, used as part of token-cache keys,
so two tokenizers that map text differently never share a cache entry).

`tokenizers` is optional: it is imported inside the functions that need it, so `import mhmoe` works without it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mhmoe.errors import DataError
from mhmoe.io import write_text

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tokenizers import Tokenizer as HFTokenizer

EOS_TOKEN = "<|endoftext|>"
# End-of-text tokens accepted in a user's tokenizer file, in order of preference.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")
# Marker written by ByteTokenizer.save so load_tokenizer can tell the file from an HF tokenizer.json.
_BYTE_MARKER = "mhmoe-byte-tokenizer"


class Tokenizer(Protocol):
    """What the data pipeline and trainer use; both tokenizers below satisfy it."""

    @property
    def name(self) -> str: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, path: str | Path) -> None: ...
    def fingerprint(self) -> str: ...


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of byte-level BPE (`tokenizers.ByteLevel`)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is end-of-text. Needs no training and no files."""

    name = "byte"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; eos is dropped and a byte sequence cut mid-character decodes to U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i <= self.eos_id]
        if bad:
            raise ValueError(f"byte tokenizer ids must be in 0..{self.eos_id}, got {bad[:5]}")
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        """A tiny JSON file, so a run directory records its tokenizer whichever kind it is."""
        definition = {"type": _BYTE_MARKER, "version": 1, "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        write_text(path, json.dumps(definition, indent=2) + "\n")

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{_BYTE_MARKER}:v1:{self.vocab_size}:{self.eos_id}".encode()).hexdigest()

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer:
    """A `tokenizers.Tokenizer` (byte-level BPE when trained here) plus the id of its end-of-text token."""

    name = "bpe"

    def __init__(self, tokenizer: HFTokenizer, eos_token: str = EOS_TOKEN) -> None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer has no end-of-text token {eos_token!r}; add it as a special token")
        # Text that happens to contain "<|endoftext|>" is data, not a document boundary: encode it as text.
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.eos_token = eos_token
        self.eos_id = int(eos_id)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Byte-level BPE learned from `texts` on this machine; the same texts give the same merges.

        The 256-symbol byte alphabet is always in the vocabulary, so any text encodes without unknowns;
        `vocab_size` counts those 256, the merges and the eos token.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        minimum = 256 + 1
        if vocab_size < minimum:
            raise ValueError(f"BPE vocab_size ({vocab_size}) must be at least {minimum} (256 bytes + eos)")
        if vocab_size > 2**32 - 1:
            raise ValueError(f"BPE vocab_size ({vocab_size}) must fit in uint32")
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer, EOS_TOKEN)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Any HF `tokenizers` JSON file; its eos is the first of EOS_CANDIDATES it defines."""
        path = Path(path)
        tokenizer = _read_hf_tokenizer(path)
        for candidate in EOS_CANDIDATES:
            if tokenizer.token_to_id(candidate) is not None:
                return cls(tokenizer, candidate)
        looked_for = ", ".join(repr(c) for c in EOS_CANDIDATES)
        raise DataError(
            f"tokenizer file {path} has no end-of-text token (looked for {looked_for}); add one as a special token"
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """The library's batch call encodes on all cores; much faster than a Python loop over `encode`."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        """Writes a standard tokenizer.json that HF `tokenizers` (and `load_tokenizer`) can read back."""
        write_text(path, self.tokenizer.to_str(pretty=True))

    def fingerprint(self) -> str:
        definition = f"bpe:{self.eos_token}:" + self.tokenizer.to_str(pretty=False)
        return hashlib.sha256(definition.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r})"


def _read_hf_tokenizer(path: Path) -> HFTokenizer:
    """Load with errors that name the file; `tokenizers` itself raises a bare Exception with a Rust message."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:
        raise DataError(f"reading tokenizer file {path} needs the `tokenizers` package; pip install tokenizers") from e
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist; pass 'byte' or the path of a tokenizer.json file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read tokenizer file {path}: {e}") from e
    try:
        return HFTokenizer.from_str(text)
    except Exception as e:  # the Rust side raises plain Exception
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path} is not a valid tokenizers JSON file ({first_line})") from e


def load_tokenizer(spec: str | Path) -> ByteTokenizer | BPETokenizer:
    """'byte' -> ByteTokenizer; a tokenizer.json path (or a folder holding one) -> the tokenizer it defines."""
    if isinstance(spec, str) and spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"unknown tokenizer {str(spec)!r}: use 'byte' or the path of an existing tokenizer.json file")
    if _is_byte_tokenizer_file(path):
        return ByteTokenizer()
    return BPETokenizer.load(path)


def _is_byte_tokenizer_file(path: Path) -> bool:
    """True for the small JSON file `ByteTokenizer.save` writes; anything else is left to `BPETokenizer.load`."""
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False  # BPETokenizer.load reports the problem with the file's name
    return isinstance(definition, dict) and definition.get("type") == _BYTE_MARKER
