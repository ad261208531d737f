"""Routing of the masked multimodal model: snapshots of held-out images' routing during training, expert activation
per modality, and the per-patch sub-token divergence over training steps (docs/paper-notes.md §6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhmoe.analysis.plots import plot_activation_heatmap, plot_patch_divergence_grid
from mhmoe.analysis.routing import (
    DEFAULT_ACTIVATION_THRESHOLD,
    LayerRouting,
    activation_ratio,
    effective_experts,
    effective_fraction,
    expert_shares,
    mean_divergence,
    summarize,
)
from mhmoe.experiments.multimodal.config import MaskedRunConfig
from mhmoe.experiments.multimodal.task import MultimodalData, eval_batches_of, to_device
from mhmoe.io import write_json
from mhmoe.layers.multihead import MHMoE
from mhmoe.models.multiway import MultiwayTransformer
from mhmoe.train.checkpoint import load_model_weights, run_checkpoint
from mhmoe.train.loop import autocast_for, resolve_device


def patch_divergence_maps(snapshot: Path) -> tuple[int, np.ndarray, np.ndarray]:
    """(step, images (n, S, S, 3), (n, g, g) per-patch divergence averaged over the vision MoE layers)."""
    with np.load(snapshot) as archive:
        heads, experts, grid = int(archive["num_heads"]), int(archive["num_experts"]), int(archive["grid"])
        layers = [LayerRouting(archive[k], heads, experts, k) for k in sorted(archive.files) if k.startswith("block")]
        images, step = archive["images"], int(archive["step"])
    return step, images, mean_divergence(layers).reshape(len(images), grid, grid)


def routing_agreement(snapshots: list[Path]) -> dict[str, dict[str, float]]:
    """How settled the vision routing is at each snapshot: the share of the display images' sub-tokens (every
    vision MoE layer, patch and head) whose first-choice expert is the one they get at the last snapshot, beside
    the agreement expected by chance from the two snapshots' first-choice shares (Σ_e p_e·q_e).
    {"step N": {"agreement": a, "chance": c}}."""
    firsts: list[tuple[int, np.ndarray, int]] = []
    for snapshot in snapshots:
        with np.load(snapshot) as archive:
            blocks = sorted(k for k in archive.files if k.startswith("block"))
            first = np.concatenate([archive[k][:, 0] for k in blocks]) if blocks else np.zeros(0, dtype=np.int64)
            firsts.append((int(archive["step"]), first, int(archive["num_experts"])))
    if not firsts or firsts[-1][1].size == 0:
        return {}
    final, experts = firsts[-1][1], firsts[-1][2]
    q = np.bincount(final, minlength=experts) / final.size
    report = {}
    for step, first, _ in firsts:
        p = np.bincount(first, minlength=experts) / first.size
        report[f"step {step}"] = {"agreement": float(np.mean(first == final)), "chance": float(p @ q)}
    return report


@torch.no_grad()
def collect_multiway_routing(
    model: MultiwayTransformer, data: MultimodalData, cfg: MaskedRunConfig, device: torch.device, max_batches: int
) -> dict[str, list]:
    """Per modality, per MoE block: the routing of unmasked held-out images (vision FFNs) and text (language FFNs)."""
    kinds = {"vision": "image", "language": "text"}
    report = {}
    was_training = model.training
    model.eval()
    for modality, kind in kinds.items():
        per_block: dict[int, list] = {}
        masks: dict[int, list] = {}
        for batch, _ in eval_batches_of(kind, data, cfg, "valid", max_batches, masked=False):
            with autocast_for(cfg.train.precision, device):
                out = model(**to_device(batch, device))
            for r in out.routing:
                per_block.setdefault(r.block, []).append(r.stats)
                masks.setdefault(r.block, []).append(r.token_mask)
        layers = model.moe_layers(modality)
        report[modality] = [
            LayerRouting.from_stats(
                per_block[block], layer.num_heads, layer.num_experts, f"block {block}",
                token_masks=None if all(m is None for m in masks[block]) else masks[block],
            )
            for block, layer in zip(sorted(per_block), layers, strict=True)
        ]  # fmt: skip
    model.train(was_training)
    return report


def analyze_masked_run(
    run_dir: Path, data: MultimodalData, cfg: MaskedRunConfig, model: MultiwayTransformer, device: torch.device
) -> dict:
    """Activation heat maps and summaries per modality, and the per-patch divergence grid over training steps,
    into run_dir/analysis/."""
    out_dir = run_dir / "analysis"
    if not model.moe_layers():
        return {"note": "dense model: no routing to analyse"}
    report: dict[str, Any] = {}
    routing = collect_multiway_routing(model, data, cfg, device, cfg.analysis.max_batches)
    both = routing["vision"] + routing["language"]  # different tokens per modality: no joint divergence
    report["all"] = dict(
        activation_ratio=activation_ratio(both),
        threshold=DEFAULT_ACTIVATION_THRESHOLD,
        effective_experts=float(np.mean([effective_experts(layer) for layer in both])),
        effective_fraction=float(np.mean([effective_fraction(layer) for layer in both])),
    )
    for modality, layers in routing.items():
        shares = np.stack([expert_shares(layer) for layer in layers])
        names = [layer.name for layer in layers]
        report[modality] = summarize(layers)
        title = f"expert share per layer, {modality} FFNs (held-out {'images' if modality == 'vision' else 'text'})"
        plot_activation_heatmap(shares, out_dir / f"heatmap-{modality}.png", title, names)
    snapshots = sorted((run_dir / "routing").glob("step-*.npz"))
    report["routing_agreement"] = routing_agreement(snapshots) or None
    if snapshots and isinstance(model.moe_layers("vision")[0], MHMoE):
        maps = [patch_divergence_maps(s) for s in snapshots]
        report["patch_divergence"] = {f"step {m[0]}": float(m[2].mean()) for m in maps}
        maps = [maps[i] for i in sorted({round(j * (len(maps) - 1) / 4) for j in range(5)})]  # ≤ 5 columns drawn
        images = maps[-1][1]
        grid = [[m[2][i] for m in maps] for i in range(len(images))]
        plot_patch_divergence_grid(
            list(images), grid, out_dir / "divergence-patches.png", [f"step {m[0]}" for m in maps]
        )
    write_json(out_dir / "analysis.json", report)
    return report


def load_masked_model(run_dir: Path, device: torch.device | None = None) -> tuple[MaskedRunConfig, MultiwayTransformer]:
    """The config and model of a run directory at its latest checkpoint."""
    with run_checkpoint(run_dir, "a masked multimodal run directory") as (config, checkpoint):
        cfg = MaskedRunConfig.from_dict(config)
        model = MultiwayTransformer(cfg.model)
        load_model_weights(checkpoint, model)
    return cfg, model.to(device or resolve_device(cfg.train.device)).eval()
