"""Images with captions for masked multimodal modelling (BEiT-3 style): sources, splits, masks, visual tokens.

Shape legend: N images, S image side (pixels), C channels (3, RGB), B batch, p patch side, P = (S/p)² patches,
Dp = p·p·C pixel values per patch, K codebook size (visual tokens), Lt text length.

Sources; each gives uint8 RGB images of one size (S × S × 3) and one or more captions per image:
    emoji          `images/captions/emoji_32.npz` (key "images", (N, 32, 32, 3)) and `emoji_captions.jsonl.gz`
                   ({"index", "char", "captions": {lang: name}}, same order): one caption per language
    Fashion-MNIST  `images/fashion-mnist/`: the four IDX files (gzip) and `classes.json`; the 28 × 28 grey
                   pictures are padded to 32 × 32 (black border, the pictures' own background) and made RGB;
                   captions are built from the class name with a few fixed templates
    image folder   a user's folder with `captions.jsonl(.gz)`: one record per image,
                   {"image": "relative/path.png", "caption": "..."} or "captions": [...] / {lang: "..."},
                   optional "split": train/valid/test; images (any format Pillow reads) are centre-cropped to
                   a square and resized to S × S
Held-out images are chosen by a hash of a stable id (never by position), so an image and all its captions land in
the same split everywhere; an image is never trained on, alone or in a pair, when it is held out.

Masking (BEiT-3): text positions are masked uniformly at random, exactly round(ratio · valid tokens) of them
(at least one); image patches are masked block-wise (BEiT's algorithm: rectangles of random area and aspect ratio)
until exactly round(ratio · P) are masked.

Visual tokens (the masked-image-modelling target): a k-means codebook over raw patches, trained here on training
images (see `VisualTokenizer`). Pillow is imported only when reading an image folder.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mhmoe.data.corpus import hash_score, jsonl_objects
from mhmoe.errors import DataError
from mhmoe.io import atomic_write
from mhmoe.models.multiway import patchify

SPLITS = ("train", "valid", "test")
IMAGE_SIDE = 32
FASHION_TEMPLATES = ("{}", "a {}", "a picture of a {}", "a grey {}", "a photo of a {}", "a small {}")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class ImageCaptions:
    """One source: images, their captions and the split of each image.

    images: (N, S, S, 3) uint8. captions: N lists, each with >= 1 caption. splits: (N,) of "train"/"valid"/"test".
    """

    name: str
    images: np.ndarray
    captions: list[list[str]]
    splits: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataError(
                f"{self.name}: images must be (N, S, S, 3) uint8, got {self.images.shape} {self.images.dtype}"
            )
        if len(self.captions) != n or len(self.splits) != n:
            raise DataError(
                f"{self.name}: {n} images but {len(self.captions)} caption lists, {len(self.splits)} splits"
            )
        empty = [i for i, c in enumerate(self.captions) if not c]
        if empty:
            raise DataError(f"{self.name}: images {empty[:5]} have no caption; every image needs at least one")

    def indices(self, split: str) -> np.ndarray:
        """(n,) indices of the images in `split`, in order."""
        return np.flatnonzero(self.splits == split)

    def pairs(self, split: str) -> np.ndarray:
        """(m, 2) (image index, caption index) of every caption of every image in `split`."""
        rows = [(i, j) for i in self.indices(split) for j in range(len(self.captions[i]))]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _hash_splits(ids: Sequence[str], valid_fraction: float, test_fraction: float, seed: int = 0) -> np.ndarray:
    scores = np.array([hash_score(i, seed) for i in ids])
    out = np.full(len(ids), "train", dtype=object)
    out[scores < valid_fraction + test_fraction] = "test"
    out[scores < valid_fraction] = "valid"
    return out


def _read_gz_or_plain(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.name.endswith(".gz") else data
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


# ------------------------------------------------------------------------------------------------ sources


def load_emoji(
    folder: str | Path, languages: Sequence[str] = (), valid_fraction=0.05, test_fraction=0.05
) -> ImageCaptions:
    """The emoji pack: images/captions/ (npz + captions JSONL). languages: caption languages to keep (all if empty)."""
    folder = Path(folder)
    npz, jsonl = folder / "emoji_32.npz", folder / "emoji_captions.jsonl.gz"
    for path in (npz, jsonl):
        if not path.is_file():
            raise DataError(
                f"emoji source {folder} has no {path.name}; expected emoji_32.npz and emoji_captions.jsonl.gz"
            )
    try:
        with np.load(npz) as archive:
            images = np.asarray(archive["images"])
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{npz} is not an npz file with an 'images' array ({e})") from e
    records = list(jsonl_objects(jsonl))
    if len(records) != len(images):
        raise DataError(f"{jsonl} has {len(records)} records but {npz} has {len(images)} images; they must match")
    captions, ids = [], []
    for position, (number, record) in enumerate(records):
        if record.get("index", position) != position or not isinstance(record.get("captions"), dict):
            raise DataError(f'{jsonl} line {number}: expected "index" {position} and a "captions" object')
        by_lang = record["captions"]
        keep = [
            by_lang[lang] for lang in (languages or by_lang) if isinstance(by_lang.get(lang), str) and by_lang[lang]
        ]
        captions.append(keep)
        ids.append(f"emoji/{record.get('char', position)}")
    return ImageCaptions("emoji", images, captions, _hash_splits(ids, valid_fraction, test_fraction))


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a uint8 array of the shape its header gives (the Fashion-MNIST format)."""
    path = Path(path)
    data = _read_gz_or_plain(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(shape)
    if len(data) != expected:
        raise DataError(f"{path} holds {len(data)} bytes, its header {shape} says {expected}: truncated or damaged")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _grey28_to_rgb32(images: np.ndarray) -> np.ndarray:
    pad = (IMAGE_SIDE - images.shape[1]) // 2
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    return np.repeat(padded[..., None], 3, axis=-1)


def load_fashion_mnist(folder: str | Path, limit: int = 0) -> ImageCaptions:
    """Fashion-MNIST with captions from class names: train images are train; t10k images split into valid/test.

    limit: keep at most this many images of each file (0 = all), the first ones, to save memory and time.
    """
    folder = Path(folder)
    try:
        classes = json.loads((folder / "classes.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(
            f"{folder / 'classes.json'} is missing or not JSON ({e}); it must list the 10 class names"
        ) from e
    images: list[np.ndarray] = []
    captions: list[list[str]] = []
    splits: list[np.ndarray] = []
    for prefix in ("train", "t10k"):
        pictures = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
        if pictures.ndim != 3 or len(pictures) != len(labels) or (labels.size and labels.max() >= len(classes)):
            raise DataError(f"{folder}: {prefix} images {pictures.shape} and labels {labels.shape} do not match")
        if limit:
            pictures, labels = pictures[:limit], labels[:limit]
        names = [classes[int(label)].lower() for label in labels]
        offset = len(captions)
        captions += [[FASHION_TEMPLATES[(offset + i) % len(FASHION_TEMPLATES)].format(n)] for i, n in enumerate(names)]
        images.append(_grey28_to_rgb32(pictures))
        if prefix == "train":
            splits.append(np.full(len(labels), "train", dtype=object))
        else:
            held = _hash_splits([f"fashion/t10k/{i}" for i in range(len(labels))], 0.5, 0.5)
            splits.append(np.where(held == "valid", "valid", "test").astype(object))
    return ImageCaptions("fashion-mnist", np.concatenate(images), captions, np.concatenate(splits))


def _load_picture(path: Path, side: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            picture = picture.convert("RGBA")
            background = Image.new("RGBA", picture.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(background, picture).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read image {path} ({e}); use a PNG/JPEG file Pillow can open") from e
    w, h = rgb.size
    edge = min(w, h)
    box = ((w - edge) // 2, (h - edge) // 2, (w - edge) // 2 + edge, (h - edge) // 2 + edge)
    return np.asarray(rgb.crop(box).resize((side, side), Image.Resampling.LANCZOS), dtype=np.uint8)


def find_captions_file(folder: Path) -> Path | None:
    for name in ("captions.jsonl", "captions.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _record_captions(record: dict, where: str) -> list[str]:
    value = record.get("captions", record.get("caption"))
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c.strip() for c in value):
        raise DataError(f'{where}: needs "caption" (a non-empty string) or "captions" (a list or object of strings)')
    return value


def load_image_folder(
    folder: str | Path, side: int = IMAGE_SIDE, valid_fraction: float = 0.05, test_fraction: float = 0.05
) -> ImageCaptions:
    """A user's folder of pictures described by `captions.jsonl(.gz)` (format in the module docstring)."""
    folder = Path(folder).expanduser()
    jsonl = find_captions_file(folder) if folder.is_dir() else None
    if jsonl is None:
        raise DataError(
            f"image folder {folder} has no captions.jsonl(.gz); add one with an image path and caption per line"
        )
    images, captions, ids, given = [], [], [], []
    for number, record in jsonl_objects(jsonl):
        where = f"{jsonl} line {number}"
        name = record.get("image")
        if not isinstance(name, str) or not name:
            raise DataError(f'{where}: needs "image", the picture\'s path relative to {folder}')
        path = (folder / name).resolve()
        if not path.is_file():
            raise DataError(f"{where}: image {name!r} does not exist in {folder}")
        split = record.get("split")
        if split is not None and split not in SPLITS:
            raise DataError(f'{where}: "split" is {split!r}; it must be one of {", ".join(SPLITS)}')
        captions.append(_record_captions(record, where))
        images.append(_load_picture(path, side))
        ids.append(f"folder/{name}")
        given.append(split)
    if not images:
        raise DataError(f"{jsonl} lists no images")
    splits = _hash_splits(ids, valid_fraction, test_fraction)
    splits = np.array([g or s for g, s in zip(given, splits)], dtype=object)
    return ImageCaptions(folder.name or "images", np.stack(images), captions, splits)


@dataclass
class SourcePaths:
    """Where each kind of data lives under a data root (any may be missing)."""

    emoji: Path | None
    fashion: Path | None
    folders: list[Path]
    text: Path | None


def find_sources(root: str | Path) -> SourcePaths:
    """The sources under a data root: the offline pack layout (images/captions/, images/fashion-mnist/, english/)
    and/or a user image folder (captions.jsonl in the root itself)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"multimodal data path {root} is not a folder; pass the data pack root or an image folder")
    emoji = root / "images" / "captions"
    fashion = root / "images" / "fashion-mnist"
    text = root / "english"
    found = SourcePaths(
        emoji=emoji if (emoji / "emoji_32.npz").is_file() else None,
        fashion=fashion if (fashion / "train-images-idx3-ubyte.gz").is_file() else None,
        folders=[root] if find_captions_file(root) else [],
        text=text if text.is_dir() else None,
    )
    if not (found.emoji or found.fashion or found.folders):
        raise DataError(
            f"no images under {root}: looked for images/captions/emoji_32.npz, "
            "images/fashion-mnist/train-images-idx3-ubyte.gz and captions.jsonl(.gz)"
        )
    return found


# ------------------------------------------------------------------------------------------------ masks


def text_masks(valid_BL: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """(B, L) bool: exactly max(1, round(ratio · n)) of each row's n valid positions, uniformly at random (none
    when n = 0). BEiT-3 replaces every masked token by [MASK] (no BERT 80/10/10)."""
    if not 0 < ratio < 1:
        raise ValueError(f"text mask ratio must be in (0, 1), got {ratio}")
    valid_BL = np.asarray(valid_BL, dtype=bool)
    scores = np.where(valid_BL, rng.random(valid_BL.shape), np.inf)  # padding sorts last
    counts = valid_BL.sum(axis=1)
    want = np.where(counts > 0, np.maximum(1, np.rint(ratio * counts)), 0).astype(np.int64)  # (B,)
    ranks = scores.argsort(axis=1).argsort(axis=1)
    return ranks < want[:, None]


def block_mask(
    grid: tuple[int, int], num_masked: int, rng: np.random.Generator, min_block: int = 4, max_aspect: float = 3.0
) -> np.ndarray:
    """(h, w) bool with exactly `num_masked` True cells, placed block-wise as in BEiT (Bao et al. 2022, Alg. 1).

    Rectangles of area in [min_block, remaining] and aspect ratio in [1/max_aspect, max_aspect] (log-uniform)
    are added while they add new cells without overshooting; when no such rectangle is found in 10 tries
    (small grids), single random cells top the mask up so the count is exact.
    """
    h, w = grid
    if not 0 <= num_masked <= h * w:
        raise ValueError(f"num_masked ({num_masked}) must be in 0..{h * w} for a {h}×{w} grid")
    mask = np.zeros((h, w), dtype=bool)
    log_aspect = (math.log(1 / max_aspect), math.log(max_aspect))
    while mask.sum() < num_masked:
        left = num_masked - int(mask.sum())
        added = 0
        for _ in range(10):
            area = rng.uniform(min(min_block, left), left)
            aspect = math.exp(rng.uniform(*log_aspect))
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if not (1 <= bh <= h and 1 <= bw <= w):
                continue
            top, lft = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            new = bh * bw - int(mask[top : top + bh, lft : lft + bw].sum())
            if 0 < new <= left:
                mask[top : top + bh, lft : lft + bw] = True
                added = new
                break
        if not added:
            free = np.flatnonzero(~mask.reshape(-1))
            mask.reshape(-1)[rng.choice(free, size=left, replace=False)] = True
    return mask


def image_masks(batch: int, grid: tuple[int, int], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """(B, P) bool block-wise masks, round(ratio · P) patches each (BEiT-3 masks 40%)."""
    if not 0 < ratio < 1:
        raise ValueError(f"image mask ratio must be in (0, 1), got {ratio}")
    count = max(1, int(round(ratio * grid[0] * grid[1])))
    return np.stack([block_mask(grid, count, rng).reshape(-1) for _ in range(batch)])


# ------------------------------------------------------------------------------------------------ visual tokens


def pixels(images_BSSC: np.ndarray | Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return torch.as_tensor(np.asarray(images_BSSC)).float() / 255.0


def kmeans(points_ND: Tensor, k: int, seed: int, iterations: int = 25) -> Tensor:
    """(k, D) centroids by Lloyd's algorithm from a k-means++ start; an emptied cluster takes the point farthest
    from its centroid. Deterministic for a given seed."""
    n = points_ND.shape[0]
    if n < k:
        raise DataError(f"k-means needs at least {k} patches for a codebook of {k}, got {n}; use a smaller codebook")
    generator = torch.Generator().manual_seed(seed)
    centroids = [points_ND[torch.randint(n, (1,), generator=generator)]]
    nearest_N = torch.cdist(points_ND, centroids[0]).square().squeeze(1)
    for _ in range(1, k):  # k-means++: next centre drawn with probability ∝ squared distance
        weights = nearest_N if nearest_N.sum() > 0 else torch.ones_like(nearest_N)
        pick = torch.multinomial(weights, 1, generator=generator)
        centroids.append(points_ND[pick])
        nearest_N = torch.minimum(nearest_N, torch.cdist(points_ND, centroids[-1]).square().squeeze(1))
    centres_KD = torch.cat(centroids)
    for _ in range(iterations):
        distance_NK = torch.cdist(points_ND, centres_KD)
        assign_N = distance_NK.argmin(dim=1)
        sums_KD = torch.zeros_like(centres_KD).index_add_(0, assign_N, points_ND)
        counts_K = torch.bincount(assign_N, minlength=k).to(points_ND.dtype)
        empty = counts_K == 0
        centres_KD = torch.where(empty[:, None], centres_KD, sums_KD / counts_K.clamp_min(1)[:, None])
        if empty.any():
            far = distance_NK.gather(1, assign_N[:, None]).squeeze(1).topk(int(empty.sum())).indices
            centres_KD[empty] = points_ND[far]
    return centres_KD


class VisualTokenizer:
    """Patches -> discrete visual tokens: the nearest centroid of a k-means codebook over raw patch pixels.

    The masked-image-modelling target (BEiT/BEiT-3 predict discrete visual tokens from a trained tokenizer,
    VQ-KD; a pretrained teacher is not available offline, so a k-means codebook plays its part). Both
    modalities are then trained with a cross-entropy over a vocabulary, and masked-patch accuracy and
    perplexity are defined. codebook: (K, Dp) in [0, 1] pixel units.
    """

    def __init__(self, codebook_KD: Tensor | np.ndarray, patch_size: int):
        self.codebook = torch.as_tensor(np.asarray(codebook_KD), dtype=torch.float32)
        self.patch_size = patch_size

    @property
    def size(self) -> int:
        return self.codebook.shape[0]

    @classmethod
    def train(cls, images: np.ndarray, size: int, patch_size: int, seed: int = 0, max_patches: int = 40_000):
        """A codebook of `size` from up to `max_patches` patches of `images` (N, S, S, 3) uint8, drawn at random."""
        patches = patchify(pixels(images), patch_size).reshape(-1, 3 * patch_size**2)
        rng = np.random.default_rng(seed)
        if len(patches) > max_patches:
            patches = patches[torch.as_tensor(rng.choice(len(patches), max_patches, replace=False))]
        return cls(kmeans(patches, size, seed), patch_size)

    def encode(self, images: np.ndarray | Tensor) -> Tensor:
        """(B, S, S, 3) uint8 -> (B, P) int64 codes."""
        patches_BPD = patchify(pixels(images), self.patch_size)
        distance = torch.cdist(patches_BPD.reshape(-1, patches_BPD.shape[-1]), self.codebook)
        return distance.argmin(dim=1).view(patches_BPD.shape[:2])

    def save(self, path: Path) -> None:
        with atomic_write(path, "wb") as f:
            np.savez(f, codebook=self.codebook.numpy(), patch_size=np.array(self.patch_size))

    @classmethod
    def load(cls, path: Path) -> VisualTokenizer:
        try:
            with np.load(path) as archive:
                return cls(archive["codebook"], int(archive["patch_size"]))
        except (OSError, KeyError, ValueError) as e:
            raise DataError(
                f"{path} is not a visual-token codebook written by mhmoe ({e}); delete it to retrain"
            ) from e

    def fingerprint(self) -> str:
        return hashlib.sha256(self.codebook.numpy().tobytes() + bytes([self.patch_size])).hexdigest()


def normalise(images: np.ndarray | Tensor) -> Tensor:
    """uint8 images -> float32 in [-1, 1], the model's input scale."""
    return pixels(images) * 2 - 1


def pad_captions(ids: Sequence[Sequence[int]], max_len: int, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Token id lists -> (B, Lt) int64 ids (truncated to max_len, padded with pad_id) and (B, Lt) bool valid."""
    length = max(1, min(max_len, max((len(i) for i in ids), default=1)))
    out = torch.full((len(ids), length), pad_id, dtype=torch.long)
    valid = torch.zeros((len(ids), length), dtype=torch.bool)
    for row, seq in enumerate(ids):
        seq = list(seq)[:length]
        out[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        valid[row, : len(seq)] = True
    return out, valid


__all__ = [
    "ImageCaptions",
    "SourcePaths",
    "VisualTokenizer",
    "block_mask",
    "find_sources",
    "image_masks",
    "kmeans",
    "load_emoji",
    "load_fashion_mnist",
    "load_image_folder",
    "normalise",
    "pad_captions",
    "read_idx",
    "text_masks",
]
