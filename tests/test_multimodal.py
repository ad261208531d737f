"""Masked multimodal modelling (BEiT-3 style): data pipelines, masks, the multiway model, analyses, end to end."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_pack, ffn_config, pack_sample

from mhmoe.errors import ConfigError, DataError
from mhmoe.experiments.multimodal.analysis import patch_divergence_maps
from mhmoe.experiments.multimodal.config import apply_masked_overrides, masked_preset
from mhmoe.experiments.multimodal.data import (
    ImageCaptions,
    VisualTokenizer,
    block_mask,
    find_sources,
    image_masks,
    kmeans,
    load_emoji,
    load_fashion_mnist,
    load_image_folder,
    pad_captions,
    read_idx,
    text_masks,
)
from mhmoe.experiments.multimodal.task import MultimodalData, make_batch, snapshot_steps, train_masked
from mhmoe.layers.moe import SparseMoE
from mhmoe.models.multiway import MultiwayConfig, MultiwayTransformer, multiway_cost, patchify

# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("ratio", [0.15, 0.5])
def test_text_masks_hit_the_ratio_on_valid_positions_only(ratio):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 41, size=500)
    valid = np.arange(40)[None, :] < lengths[:, None]  # (500, 40), padding at the end
    masks = text_masks(valid, ratio, rng)
    assert not (masks & ~valid).any()
    counts = masks.sum(axis=1)
    expected = np.where(lengths > 0, np.maximum(1, np.rint(ratio * lengths)), 0)
    np.testing.assert_array_equal(counts, expected)
    assert abs(counts.sum() / lengths.sum() - ratio) < 0.02
    # every valid position is equally likely to be masked (no positional bias)
    full = text_masks(np.ones((4000, 20), bool), ratio, rng).mean(axis=0)
    assert np.abs(full - round(ratio * 20) / 20).max() < 0.04


def test_block_masks_hit_the_count_and_are_blockwise():
    rng = np.random.default_rng(1)
    for grid, ratio in [((8, 8), 0.4), ((4, 4), 0.4), ((14, 14), 0.4), ((8, 8), 0.9)]:
        masks = image_masks(200, grid, ratio, rng)
        assert masks.shape == (200, grid[0] * grid[1])
        assert (masks.sum(axis=1) == round(ratio * grid[0] * grid[1])).all()

    def masked_neighbours(mask):  # mean number of masked 4-neighbours of a masked cell
        padded = np.pad(mask, 1)
        around = padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        return around[mask].mean()

    blocks = np.mean([masked_neighbours(block_mask((8, 8), 26, rng)) for _ in range(200)])
    scattered = np.mean([masked_neighbours(rng.permutation(64).reshape(8, 8) < 26) for _ in range(200)])
    assert blocks > scattered + 0.5, (blocks, scattered)  # block-wise masks are clumped, random ones are not


def test_mask_errors():
    with pytest.raises(ValueError, match="num_masked"):
        block_mask((4, 4), 17, np.random.default_rng(0))
    with pytest.raises(ValueError, match="ratio"):
        text_masks(np.ones((2, 3), bool), 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="ratio"):
        image_masks(2, (4, 4), 0.0, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------ sources


@pytest.mark.data_pack
def test_emoji_images_get_their_own_captions():
    folder = data_pack("images", "captions")
    source = load_emoji(folder)
    records = [json.loads(line) for line in gzip.open(folder / "emoji_captions.jsonl.gz", "rt", encoding="utf-8")]
    images = np.load(folder / "emoji_32.npz")["images"]
    assert source.images.shape == images.shape == (len(records), 32, 32, 3)
    for i in (0, 1, 500, len(records) - 1):
        assert np.array_equal(source.images[i], images[i])
        assert source.captions[i] == list(records[i]["captions"].values())
    pairs = source.pairs("valid")
    assert len(pairs) == 7 * len(source.indices("valid"))
    for i, j in pairs[:20]:
        assert source.captions[i][j] in records[i]["captions"].values()
    english = load_emoji(folder, languages=["en"])
    assert all(len(c) == 1 for c in english.captions) and english.captions[0] == ["1st place medal"]
    splits = {s: set(source.indices(s)) for s in ("train", "valid", "test")}
    assert sum(map(len, splits.values())) == len(records) and not splits["train"] & (splits["valid"] | splits["test"])
    assert 0.03 < len(splits["valid"]) / len(records) < 0.07
    np.testing.assert_array_equal(load_emoji(folder).splits, source.splits)  # by hash: the same every time


@pytest.mark.data_pack
def test_fashion_mnist_loader_on_the_real_files():
    folder = data_pack("images", "fashion-mnist")
    source = load_fashion_mnist(folder, limit=300)
    classes = json.loads((folder / "classes.json").read_text())
    raw = read_idx(folder / "train-images-idx3-ubyte.gz")
    labels = read_idx(folder / "train-labels-idx1-ubyte.gz")
    assert raw.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert source.images.shape == (600, 32, 32, 3)
    np.testing.assert_array_equal(source.images[:300, 2:30, 2:30, 1], raw[:300])
    assert (source.images[:, :2] == 0).all() and (source.images[..., 0] == source.images[..., 2]).all()
    for i in range(300):
        assert classes[labels[i]].lower() in source.captions[i][0]
    assert set(source.splits[:300]) == {"train"} and set(source.splits[300:]) == {"valid", "test"}


def test_read_idx_rejects_damaged_files(tmp_path):
    good = np.arange(12, dtype=np.uint8).reshape(3, 4)
    header = bytes([0, 0, 8, 2]) + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    (tmp_path / "ok.idx").write_bytes(header + good.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "ok.idx"), good)
    (tmp_path / "short.idx.gz").write_bytes(gzip.compress(header + good.tobytes()[:-1]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short.idx.gz")
    (tmp_path / "text.idx").write_bytes(b"hello world")
    with pytest.raises(DataError, match="IDX"):
        read_idx(tmp_path / "text.idx")


def _write_folder(folder: Path, records: list[dict], colours: dict[str, tuple]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in colours.items():
        Image.new("RGB", (40, 20), colour).save(folder / name)  # not square: centre-cropped, then resized
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_image_folder_with_captions_jsonl(tmp_path):
    colours = {"red.png": (255, 0, 0), "green.png": (0, 255, 0), "blue.png": (0, 0, 255), "grey.png": (90, 90, 90)}
    records = [
        {"image": "red.png", "caption": "a red square", "split": "train"},
        {"image": "green.png", "captions": ["green", "a green square"], "split": "valid"},
        {"image": "blue.png", "captions": {"en": "blue", "de": "blau"}, "split": "test"},
        {"image": "grey.png", "caption": "grey"},
    ]
    _write_folder(tmp_path / "pics", records, colours)
    source = load_image_folder(tmp_path / "pics")
    assert source.images.shape == (4, 32, 32, 3) and source.images.dtype == np.uint8
    for picture, colour in zip(source.images, colours.values()):
        assert (np.abs(picture.astype(int) - colour) <= 1).all()
    assert source.captions == [["a red square"], ["green", "a green square"], ["blue", "blau"], ["grey"]]
    assert list(source.splits[:3]) == ["train", "valid", "test"]
    assert find_sources(tmp_path / "pics").folders == [tmp_path / "pics"]


@pytest.mark.parametrize(
    "record,message",
    [
        ({"image": "missing.png", "caption": "x"}, "does not exist"),
        ({"image": "red.png"}, '"caption"'),
        ({"image": "red.png", "caption": ""}, '"caption"'),
        ({"caption": "x"}, '"image"'),
        ({"image": "red.png", "caption": "x", "split": "dev"}, "split"),
        ({"image": "notes.txt", "caption": "x"}, "cannot read image"),
    ],
)
def test_image_folder_errors(tmp_path, record, message):
    _write_folder(tmp_path, [record], {"red.png": (255, 0, 0)})
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(DataError, match=message):
        load_image_folder(tmp_path)


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="no captions.jsonl"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="no images under"):
        find_sources(tmp_path)
    (tmp_path / "captions.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="no emoji_32.npz"):
        load_emoji(tmp_path)
    with pytest.raises(DataError, match="no caption"):
        ImageCaptions("x", np.zeros((1, 4, 4, 3), np.uint8), [[]], np.array(["train"], dtype=object))


# ------------------------------------------------------------------------------------------------ batches


class _CharTokenizer:
    vocab_size = 128

    def encode_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]


def _numbered_data(n: int = 12, patch: int = 8) -> MultimodalData:
    """Image i is filled with the value 10·i and captioned 'image i' / 'bild i'."""
    images = np.stack([np.full((32, 32, 3), 10 * i, np.uint8) for i in range(n)])
    captions = [[f"image {i}", f"bild {i}"] for i in range(n)]
    splits = np.array(["train"] * (n - 4) + ["valid"] * 2 + ["test"] * 2, dtype=object)
    source = ImageCaptions("numbered", images, captions, splits)
    tokenizer = _CharTokenizer()
    ids = [[tokenizer.encode_batch([c])[0] for c in caps] for caps in captions]
    visual = VisualTokenizer(torch.rand(16, 3 * patch * patch), patch)
    return MultimodalData(tokenizer, visual, {}, [source], [ids], "memory")


def test_pair_batches_pair_each_image_with_its_own_caption():
    from mhmoe.experiments.multimodal.task import _draw_items, heldout_items

    data = _numbered_data()
    cfg = masked_preset("tiny")
    rng = np.random.default_rng(0)
    items = _draw_items(data, rng, 64, with_caption=True)
    assert {s for s, _, _ in items} == {0} and all(data.sources[0].splits[i] == "train" for _, i, _ in items)
    batch = make_batch("pair", data, cfg, rng, items=items)
    for row in range(64):
        number = round((batch["images"][row, 0, 0, 0].item() + 1) / 2 * 255 / 10)  # pixels back to the image index
        caption = "".join(chr(int(t)) for t, ok in zip(batch["text"][row], batch["text_valid"][row]) if ok)
        assert caption.split()[-1] == str(number), (row, caption, number)
    held = heldout_items(data, "valid", with_caption=True)
    assert held == [(0, 8, 0), (0, 8, 1), (0, 9, 0), (0, 9, 1)]
    m = cfg.model
    assert batch["image_mask"].shape == (64, m.num_patches) and batch["image_targets"].shape == (64, m.num_patches)
    assert (batch["text_mask"] <= batch["text_valid"]).all()


def test_pad_captions():
    ids, valid = pad_captions([[5, 6, 7], [8], list(range(30))], max_len=4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [0, 1, 2, 3]]
    assert valid.sum(dim=1).tolist() == [3, 1, 4]


def test_visual_tokenizer_recovers_clusters_and_round_trips(tmp_path):
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    points = torch.cat([c + 0.1 * torch.randn(200, 2) for c in centres])
    found = kmeans(points, 3, seed=0)
    assert torch.cdist(centres, found).min(dim=1).values.max() < 0.1
    images = np.zeros((4, 32, 32, 3), np.uint8)
    images[1] = 255
    images[2, :16] = 255
    visual = VisualTokenizer.train(images, size=2, patch_size=8)
    codes = visual.encode(images)
    assert codes.shape == (4, 16) and len(set(codes[0].tolist())) == 1 and codes[0, 0] != codes[1, 0]
    assert codes[2, :8].eq(codes[1, 0]).all() and codes[2, 8:].eq(codes[0, 0]).all()
    visual.save(tmp_path / "v.npz")
    again = VisualTokenizer.load(tmp_path / "v.npz")
    assert torch.equal(again.codebook, visual.codebook) and again.fingerprint() == visual.fingerprint()
    with pytest.raises(DataError, match="at least 5"):
        kmeans(points[:4], 5, seed=0)


# ------------------------------------------------------------------------------------------------ model


def _model(kind: str = "mhmoe", **ffn) -> MultiwayTransformer:
    defaults = dict(kind=kind, hidden=64, num_experts=4, top_k=2, expert_hidden=32, num_heads=2, moe_every=1)
    cfg = MultiwayConfig(vocab_size=50, max_text_len=12, patch_size=8, codebook_size=16, d_model=32, n_layers=2,
                         n_heads=2, ffn=ffn_config(**{**defaults, **ffn}))  # fmt: skip
    torch.manual_seed(0)
    return MultiwayTransformer(cfg)


def _inputs(B: int = 3, Lt: int = 10):
    torch.manual_seed(1)
    images = torch.rand(B, 32, 32, 3) * 2 - 1
    text = torch.randint(0, 49, (B, Lt))
    valid = torch.ones(B, Lt, dtype=torch.bool)
    valid[0, 6:] = False
    text_mask = (torch.rand(B, Lt) < 0.5) & valid
    text_mask[:, 0] = True
    image_mask = torch.zeros(B, 16, dtype=torch.bool)
    image_mask[:, :6] = True
    targets = torch.randint(0, 16, (B, 16))
    return dict(images=images, text=text, text_valid=valid, text_mask=text_mask, image_mask=image_mask,
                image_targets=targets)  # fmt: skip


@pytest.mark.parametrize("kind", ["dense", "smoe", "mhmoe"])
def test_model_forward_backward_and_exact_parameter_count(kind):
    model = _model(kind)
    out = model(**_inputs())
    assert out.hidden.shape == (3, 16 + 10, 32)
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "vision_head" in name or "patch" in name)
    assert multiway_cost(model.cfg).params_total == sum(p.numel() for p in model.parameters())
    assert len(out.routing) == (0 if kind == "dense" else 4)  # 2 blocks × 2 modalities


def test_losses_are_cross_entropy_at_masked_positions_only():
    model = _model()
    batch = _inputs()
    out = model(**batch)
    text_logits = model.lm_head(out.hidden[:, 16:])[batch["text_mask"]]
    expected_text = torch.nn.functional.cross_entropy(text_logits, batch["text"][batch["text_mask"]])
    image_logits = model.vision_head(out.hidden[:, :16])[batch["image_mask"]]
    expected_image = torch.nn.functional.cross_entropy(image_logits, batch["image_targets"][batch["image_mask"]])
    torch.testing.assert_close(out.text_loss, expected_text)
    torch.testing.assert_close(out.image_loss, expected_image)
    torch.testing.assert_close(out.loss, expected_text + expected_image)


def test_masked_and_padded_inputs_do_not_leak():
    model = _model().eval()
    batch = _inputs()
    out = model(**batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["text"][batch["text_mask"]] = 7  # other ids where masked
    changed["text"][~batch["text_valid"]] = 3  # other ids in padding
    patches = patchify(changed["images"], 8)  # a view: other pixels in masked patches
    patches[batch["image_mask"]] = 0.123
    changed["images"] = patches.reshape(3, 4, 4, 8, 8, 3).permute(0, 1, 3, 2, 4, 5).reshape(3, 32, 32, 3)
    assert not torch.equal(changed["images"], batch["images"])
    again = model(**changed)
    keep = torch.cat([torch.ones(3, 16, dtype=torch.bool), batch["text_valid"]], dim=1)
    torch.testing.assert_close(again.hidden[keep], out.hidden[keep])
    torch.testing.assert_close(again.text_logits, out.text_logits)  # (the targets themselves changed)
    torch.testing.assert_close(again.image_loss, out.image_loss)


def test_text_goes_through_language_ffns_and_patches_through_vision_ffns():
    model = _model("smoe").eval()
    seen: dict[str, list] = {"vision": [], "language": []}
    for block in model.blocks:
        for modality in ("vision", "language"):
            block.ffn[modality].register_forward_hook(
                lambda module, args, output, m=modality: seen[m].append((tuple(args[0].shape), args[1]))
            )
    batch = _inputs()
    out = model(**batch)
    assert [shape for shape, _ in seen["vision"]] == [(3, 16, 32)] * 2
    assert [shape for shape, _ in seen["language"]] == [(3, 10, 32)] * 2
    assert all(mask is None for _, mask in seen["vision"])
    assert all(torch.equal(mask, batch["text_valid"]) for _, mask in seen["language"])
    for r in out.routing:  # padding is not routed: K assignments per valid token only
        tokens = 3 * 16 if r.modality == "vision" else int(batch["text_valid"].sum())
        assert int(r.stats.tokens_per_expert.sum()) == 2 * tokens
    seen["vision"].clear()
    model(text=batch["text"], text_valid=batch["text_valid"])
    assert seen["vision"] == []  # text alone never reaches a vision FFN
    # a text-only forward does not depend on the vision FFNs at all, and vice versa
    reference = model(text=batch["text"], text_valid=batch["text_valid"]).hidden
    images_only = model(images=batch["images"]).hidden
    with torch.no_grad():
        for layer in model.moe_layers("vision"):
            for p in layer.parameters():
                p.add_(1.0)
    torch.testing.assert_close(model(text=batch["text"], text_valid=batch["text_valid"]).hidden, reference)
    assert not torch.allclose(model(images=batch["images"]).hidden, images_only)
    assert all(isinstance(m, SparseMoE) for m in model.moe_layers())


def test_model_input_errors():
    model = _model()
    batch = _inputs()
    with pytest.raises(ValueError, match="neither"):
        model()
    with pytest.raises(ValueError, match="images must be float"):
        model(images=torch.zeros(2, 28, 28, 3))
    with pytest.raises(ValueError, match="same batch size"):
        model(images=batch["images"][:2], text=batch["text"])
    with pytest.raises(ValueError, match="image_targets"):
        model(images=batch["images"], image_mask=batch["image_mask"])
    with pytest.raises(ValueError, match="text_mask must be bool"):
        model(text=batch["text"], text_mask=batch["text_mask"].long())
    with pytest.raises(ValueError, match="Lt <= 12"):
        model(text=torch.zeros(1, 13, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ analyses


def test_patch_divergence_from_a_hand_made_snapshot(tmp_path):
    # 2 images, 2×2 patches, H = 2 heads, top-1, 2 MoE layers: divergence = distinct experts per patch
    layer_a = np.array([[0], [0], [0], [1], [2], [3], [1], [1]] * 2)  # patch divergences 1, 2, 2, 1 per image
    layer_b = np.array([[0], [1], [0], [1], [0], [1], [0], [1]] * 2)  # 2 everywhere
    np.savez(tmp_path / "s.npz", step=np.array(30), images=np.zeros((2, 8, 8, 3), np.uint8), grid=np.array(2),
             num_heads=np.array(2), num_experts=np.array(4), block2=layer_a, block4=layer_b)  # fmt: skip
    step, images, maps = patch_divergence_maps(tmp_path / "s.npz")
    assert step == 30 and images.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(maps, np.array([[[1.5, 2.0], [2.0, 1.5]]] * 2))


def test_routing_agreement_with_the_last_snapshot(tmp_path):
    from mhmoe.experiments.multimodal.analysis import routing_agreement

    def snapshot(step, first):  # 4 sub-tokens, top-2 (only the first choice counts), 1 layer
        second = (np.array(first) + 1) % 4
        top = np.stack([first, second], axis=1)
        path = tmp_path / f"step-{step:08d}.npz"
        np.savez(path, step=np.array(step), num_experts=np.array(4), block1=top)
        return path

    paths = [snapshot(0, [0, 0, 0, 0]), snapshot(5, [0, 1, 3, 3]), snapshot(9, [0, 1, 2, 3])]
    report = routing_agreement(paths)
    assert report["step 0"] == {"agreement": 0.25, "chance": 0.25}  # all on expert 0; final spreads 1/4 each
    assert report["step 5"]["agreement"] == 0.75 and report["step 9"]["agreement"] == 1.0
    assert report["step 9"]["chance"] == 0.25 and routing_agreement([]) == {}


def test_divergence_grid_plot(tmp_path):
    from mhmoe.analysis.plots import plot_patch_divergence_grid

    images = [np.zeros((32, 32, 3), np.uint8), np.full((32, 32), 0.5)]
    maps = [[np.ones((4, 4)), np.full((4, 4), 2.0)], [np.eye(4) + 1, np.full((4, 4), 3.0)]]
    path = plot_patch_divergence_grid(images, maps, tmp_path / "grid.png", ["step 0", "step 10"])
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="one row of 2 maps per image"):
        plot_patch_divergence_grid(images, maps[:1], tmp_path / "bad.png", ["step 0", "step 10"])


@pytest.fixture(autouse=True)
def _restore_threads():
    """Training sets torch's thread count (train.threads=1 in these tiny runs); put it back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and far faster when other jobs share the cores
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("quick,gpu", [(True, False), (False, True)])
def test_variants_are_matched(quick, gpu):
    import copy

    from mhmoe.experiments.common import variants
    from mhmoe.experiments.multimodal.experiment import multimodal_base

    base = multimodal_base(quick=quick, gpu=gpu)
    costs = {}
    for variant in variants(base.model.d_model, base.model.ffn, "all"):
        cfg = copy.deepcopy(base.model)
        cfg.ffn = variant.ffn
        costs[variant.name] = multiway_cost(cfg)
    assert abs(costs["mhmoe_params"].params_total / costs["xmoe"].params_total - 1) < 0.01
    assert abs(costs["mhmoe_flops"].flops_per_token / costs["xmoe"].flops_per_token - 1) < 0.02
    assert abs(costs["mhmoe_flops"].params_total / costs["xmoe"].params_total - 1) < 0.05
    assert costs["mhmoe_params"].flops_per_token > 1.5 * costs["xmoe"].flops_per_token


def test_snapshot_steps():
    assert snapshot_steps(150, 4) == [0, 50, 100, 150]
    assert snapshot_steps(4, 3) == [0, 2, 4] and snapshot_steps(10, 1) == [10] and snapshot_steps(10, 0) == []


# ------------------------------------------------------------------------------------------------ config, training


def test_config_errors(monkeypatch):
    cfg = masked_preset("tiny")
    with pytest.raises(ConfigError, match="did you mean 'data.image_mask_ratio'"):
        apply_masked_overrides(cfg, ["data.image_mask_rato=0.5"])
    with pytest.raises(ConfigError, match="data.image_mask_ratio must be in"):
        apply_masked_overrides(cfg, ["data.image_mask_ratio=1.5"])
    with pytest.raises(ConfigError, match="data.tasks"):
        apply_masked_overrides(masked_preset("tiny"), ["data.tasks=text,video"])
    with pytest.raises(ConfigError, match="model.ffn.moe: top_k"):
        apply_masked_overrides(masked_preset("tiny"), ["model.ffn.moe.top_k=9"])
    with pytest.raises(ConfigError, match="unknown masked preset"):
        masked_preset("huge")
    monkeypatch.delenv("MHMOE_MULTIMODAL_DATA", raising=False)
    with pytest.raises(DataError, match="no multimodal data"):
        train_masked(masked_preset("tiny"), Path("/nonexistent-run"), progress=False)


@pytest.fixture
def small_text(tmp_path) -> Path:
    text = gzip.open(pack_sample("english", "valid.txt.gz"), "rt", encoding="utf-8").read()[:60_000]
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.txt").write_text(text[i * 10_000 : (i + 1) * 10_000])
    return folder


def test_training_resumes_exactly(tmp_path, monkeypatch, small_text):
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    overrides = [f"data.path={pack_sample()}", f"data.text={small_text}", "data.fashion_limit=100"]
    straight = apply_masked_overrides(masked_preset("tiny"), overrides + ["train.max_steps=4"])
    first = train_masked(straight, tmp_path / "straight", progress=False)
    half = apply_masked_overrides(masked_preset("tiny"), overrides + ["train.max_steps=2", "train.checkpoint_every=2"])
    train_masked(half, tmp_path / "resumed", progress=False)
    rest = apply_masked_overrides(masked_preset("tiny"), overrides + ["train.max_steps=4"])
    second = train_masked(rest, tmp_path / "resumed", progress=False)
    assert second.step == first.step == 4 and second.tokens_seen == first.tokens_seen
    assert second.valid == first.valid
    assert sorted(p.name for p in (tmp_path / "straight" / "routing").iterdir()) == [
        "step-00000000.npz", "step-00000002.npz", "step-00000004.npz"
    ]  # fmt: skip


def test_reproduce_multimodal_end_to_end(tmp_path, monkeypatch, capsys, small_text):
    from mhmoe.cli import main

    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    toy = ["data.tokenizer=byte", "data.fashion_limit=100", f"data.text={small_text}", "model.d_model=32",
           "model.n_layers=2", "model.n_heads=2", "model.max_text_len=16", "data.caption_len=12", "model.patch_size=8",
           "model.codebook_size=16", "model.ffn.hidden=64", "model.ffn.moe.expert_hidden=64", "model.ffn.moe.num_experts=4",
           "train.batch_size=4", "train.max_steps=4", "train.eval_every=4", "train.eval_batches=2", "train.threads=1",
           "train.final_eval_batches=2", "analysis.snapshots=3", "analysis.display_images=2", "analysis.max_batches=2"]  # fmt: skip
    args = ["reproduce", "multimodal", "--quick", "--part", "params", "--out", str(out), "--data", str(pack_sample())]
    args += ["--no-progress"]
    assert main(args + [item for kv in toy for item in ("--set", kv)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "multimodal"
    assert set(results["models"]) == {"dense", "xmoe", "mhmoe_params"}
    assert set(results["sources"]) == {"emoji", "fashion-mnist"}
    costs = {name: m["flops_per_token"] for name, m in results["models"].items()}
    assert costs["mhmoe_params"] > costs["xmoe"]  # (matching at real sizes: test_variants_are_matched)
    for name, m in results["models"].items():
        for key in ("val_ppl", "test_ppl", "val_pair_ppl", "test_pair_ppl"):
            assert 1 < m[key] < 300, (name, key)  # byte vocabulary: 257 tokens + [MASK]
        assert 0 <= m["test_patch_acc"] <= 1 and m["test_patch_loss"] > 0
        assert m["tokens_seen"] == results["models"]["dense"]["tokens_seen"]  # the same batches for every model
        if name != "dense":
            assert 1 <= m["effective_experts_vision"] <= m["num_experts"]
            assert 1 <= m["effective_experts_language"] <= m["num_experts"]
            assert (out / "heatmaps" / f"{name}-vision.png").exists()
    assert set(results["models"]["mhmoe_params"]["patch_divergence"]) == {"step 0", "step 2", "step 4"}
    assert set(results["models"]["xmoe"]["routing_agreement"]) == {"step 0", "step 2", "step 4"}
    assert results["models"]["xmoe"]["routing_agreement"]["step 4"] == 1.0
    assert (out / "divergence" / "mhmoe_params.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "val_curves.png").exists() and (out / "val_curves_patches.png").exists()
    table = (out / "results.md").read_text()
    assert "pair ppl" in table and "| model | step 0 | step 2 | step 4 |" in table
    routing = table.split("Routing per modality")[1].split("Per head:")[0]
    assert "| mhmoe_params | vision |" in routing and "| mhmoe_params | language |" in routing
    assert "| dense |" not in routing  # no experts, no routing
    settling = table.split("Vision routing settling")[1]
    row = next(line for line in settling.splitlines() if line.startswith("| xmoe |"))
    assert row.split(" | ")[-1].startswith("1.00 (")  # the last snapshot agrees with itself
    assert "mhmoe_params" in capsys.readouterr().out


def test_emoji_and_fashion_loaders_on_the_pack_sample():
    """The loaders on the committed sample of the pack (the whole pack: the two data_pack tests above)."""
    folder = pack_sample("images", "captions")
    source = load_emoji(folder)
    records = [json.loads(line) for line in gzip.open(folder / "emoji_captions.jsonl.gz", "rt", encoding="utf-8")]
    assert source.images.shape == (len(records), 32, 32, 3) == (64, 32, 32, 3)
    assert source.captions[0] == list(records[0]["captions"].values())
    assert load_emoji(folder, languages=["en"]).captions[0] == ["1st place medal"]
    fashion = pack_sample("images", "fashion-mnist")
    classes = json.loads((fashion / "classes.json").read_text())
    labels = read_idx(fashion / "train-labels-idx1-ubyte.gz")
    loaded = load_fashion_mnist(fashion, limit=50)
    assert loaded.images.shape == (100, 32, 32, 3)
    np.testing.assert_array_equal(
        loaded.images[:50, 2:30, 2:30, 1], read_idx(fashion / "train-images-idx3-ubyte.gz")[:50]
    )
    assert all(classes[labels[i]].lower() in loaded.captions[i][0] for i in range(50))
