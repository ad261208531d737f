"""Figures of the papers' analyses (docs/paper-notes.md §6): activation heat map, head usage,
divergence histogram, curves, image-patch divergence.

matplotlib is optional: it is imported inside `_new_figure` only, and figures are drawn on the Agg
canvas directly (no pyplot, no global figure state, no display needed), so `import mhmoe` works without
it. Every function writes its PNG atomically (temp file in the same folder, then os.replace, so a reader
never sees half a file), creates parent folders, and returns the path.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mhmoe.io import atomic_write

PathLike = str | os.PathLike[str]


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure attached to an Agg canvas; the lazy import keeps matplotlib optional."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("mhmoe.plots needs matplotlib: pip install matplotlib") from e
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: PathLike) -> Path:
    """Write a PNG atomically (`mhmoe.io.atomic_write`)."""
    with atomic_write(path, "wb") as f:
        figure.savefig(f, format="png")
    return Path(path)


def _title(target: Any, title: str, share: float = 1.0, fontsize: float = 10) -> None:
    """Title a figure (`target` a Figure: its suptitle, centred on the figure) or one axes of several (an Axes),
    wrapped at word boundaries to lines that fit `share` of the figure's width, measured with the figure's renderer
    rather than guessed from a character count, so that no title is cut off. (An axes title is centred over the
    axes, which the y label pushes right: a single plot's title goes on the figure, where the whole width is its.)"""
    figure = target if hasattr(target, "suptitle") else target.get_figure()
    room = share * figure.get_figwidth() * figure.dpi - 12  # pixels, less a margin at the figure's edges
    renderer = figure.canvas.get_renderer()

    def width(columns: int) -> float:
        text = "\n".join(textwrap.wrap(title, columns))
        artist = (
            target.suptitle(text, fontsize=fontsize) if target is figure else target.set_title(text, fontsize=fontsize)
        )
        return artist.get_window_extent(renderer).width

    low, high = 8, max(len(title), 8)  # the longest wrap that fits: the width grows with the columns allowed
    if width(high) > room:
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if width(middle) <= room else (low, middle)
        width(low)


def _matrix(values: Any, what: str) -> np.ndarray:
    matrix = np.asarray(values, dtype=float)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"{what} must be a non-empty 2-D array, got shape {matrix.shape}")
    return matrix


def _heatmap(
    matrix: np.ndarray,
    path: PathLike,
    title: str,
    rows: Sequence[str],
    ylabel: str,
    cbar: str,
    vmax: float | None = None,
) -> Path:
    """(rows, E) matrix as a heat map: columns are experts, colour from 0 up to `vmax` (default: the largest
    value; pass one fixed value to every figure of a set so that they compare by eye; larger values saturate)."""
    n_rows, n_experts = matrix.shape
    width, height = min(4 + 0.35 * n_experts, 16), min(max(3.0, 1.6 + 0.35 * n_rows), 12)
    figure = _new_figure(width, height)
    ax = figure.add_subplot()
    top = vmax if vmax is not None else max(matrix.max(), 1e-12)
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=top)
    step = max(1, n_experts // 32)  # keep expert ticks legible at E = 256
    ax.set_xticks(range(0, n_experts, step))
    ax.set_yticks(range(n_rows), labels=rows)
    ax.set_xlabel("expert (index)")
    ax.set_ylabel(ylabel)
    _title(figure, title)
    # the colour-bar label runs along the figure's height: wrapped to fit it, so that nothing is cut off
    figure.colorbar(image, ax=ax, label="\n".join(textwrap.wrap(cbar, int(height * 9))))
    return _save(figure, path)


def plot_activation_heatmap(
    shares: np.ndarray,
    path: PathLike,
    title: str,
    layer_names: Sequence[str] | None = None,
    colorbar_label: str = "share of routed assignments",
    vmax: float | None = None,
) -> Path:
    """Heat map of (layers, E) expert shares or selection ratios (notes §6 "expert activation").

    Rows are MoE layers (labelled by layer_names, default "layer 0", …), columns experts.
    Pass colorbar_label="selection ratio" when plotting `selection_ratio`; vmax: the top of the colour scale.
    """
    matrix = _matrix(shares, "shares")
    names = list(layer_names) if layer_names is not None else [f"layer {i}" for i in range(matrix.shape[0])]
    if len(names) != matrix.shape[0]:
        raise ValueError(f"got {len(names)} layer_names for {matrix.shape[0]} rows of shares")
    return _heatmap(matrix, path, title, names, "MoE layer", colorbar_label, vmax)


def plot_language_usage(shares: np.ndarray, path: PathLike, title: str, languages: Sequence[str]) -> Path:
    """Heat map of (languages, E) expert shares of one MoE layer: which experts each language's tokens go to."""
    matrix = _matrix(shares, "shares")
    if len(languages) != matrix.shape[0]:
        raise ValueError(f"got {len(languages)} languages for {matrix.shape[0]} rows of shares")
    return _heatmap(matrix, path, title, list(languages), "language", "share of the language's assignments")


def plot_head_usage(
    usage: np.ndarray,
    path: PathLike,
    title: str,
    colorbar_label: str = "share of the head's assignments",
    vmax: float | None = None,
) -> Path:
    """Heat map of `analysis.head_usage`, (H, E): which experts each head's sub-tokens go to."""
    matrix = _matrix(usage, "usage")
    heads = [f"head {j}" for j in range(matrix.shape[0])]
    return _heatmap(matrix, path, title, heads, "MH-MoE head", colorbar_label, vmax)


def _integer_histogram(values: np.ndarray, max_value: int, group: str) -> np.ndarray:
    """(max_value,) fraction of values per integer 1..max_value; non-integers round to the nearest."""
    binned = np.floor(np.asarray(values, dtype=float).reshape(-1) + 0.5).astype(np.int64)
    if binned.size == 0:
        raise ValueError(f"divergence group {group!r} is empty")
    if binned.min() < 1 or binned.max() > max_value:
        raise ValueError(f"group {group!r}: values must round into 1..{max_value}, got {binned.min()}..{binned.max()}")
    return np.bincount(binned, minlength=max_value + 1)[1:] / binned.size


def plot_divergence_histogram(
    groups: Mapping[str, np.ndarray], path: PathLike, title: str, max_value: int | None = None
) -> Path:
    """Side-by-side normalised histograms of per-token divergence, one bar per integer value and group.

    groups: name -> (T_g,) divergence values (e.g. "polysemous" vs "other", notes §6). Averaged values
    from `mean_divergence` are binned to the nearest integer. max_value: the last bar (default: largest value).
    """
    if not groups:
        raise ValueError("plot_divergence_histogram needs at least one group, got none")
    if max_value is not None and (isinstance(max_value, bool) or not isinstance(max_value, int) or max_value < 1):
        raise ValueError(f"max_value must be a positive integer or None, got {max_value!r}")
    top = max_value or int(max(np.floor(np.max(np.asarray(v, dtype=float)) + 0.5) for v in groups.values()))
    xs = np.arange(1, top + 1)
    width = 0.8 / len(groups)
    figure = _new_figure(min(max(4.8, 3 + 0.45 * top), 12), 3.2)  # at least the x label's width
    ax = figure.add_subplot()
    highest = 0.0
    for g, (name, values) in enumerate(groups.items()):
        fractions = _integer_histogram(values, top, name)
        label = f"{name} (n={np.size(values)}, mean {np.mean(values):.2f})"
        ax.bar(xs + (g - (len(groups) - 1) / 2) * width, fractions, width=width, label=label)
        highest = max(highest, fractions.max())
    ax.set_ylim(0, highest * (1.15 + 0.1 * len(groups)))  # headroom so the legend covers no bar
    ax.set_xticks(xs)
    ax.set_xlabel("distinct experts per token (sub-token divergence)")
    ax.set_ylabel("fraction of tokens")
    _title(figure, title)
    ax.legend()
    return _save(figure, path)


def plot_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: PathLike,
    title: str,
    xlabel: str = "training tokens",
    ylabel: str = "validation loss (nats/token)",
    bands: Mapping[str, Sequence[tuple[float, float, float]]] | None = None,
) -> Path:
    """One line per model from (x, y) points; optional shaded bands (x, low, high), e.g. the seed spread."""
    if not curves:
        raise ValueError("plot_curves needs at least one curve, got none")
    unknown = sorted(set(bands or {}) - set(curves))
    if unknown:
        raise ValueError(f"bands {unknown} name no curve; curves are {sorted(curves)}")
    figure = _new_figure(6, 3.8)
    ax = figure.add_subplot()
    for name, points in curves.items():
        x, y = np.asarray(sorted(points), dtype=float).reshape(-1, 2).T
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=name)
        if bands and name in bands:
            bx, low, high = np.asarray(sorted(bands[name]), dtype=float).reshape(-1, 3).T
            ax.fill_between(bx, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(figure, title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(figure, path)


def plot_patch_divergence(
    images: np.ndarray | Sequence[np.ndarray],
    divergence_maps: Sequence[np.ndarray],
    path: PathLike,
    titles: Sequence[str],
) -> Path:
    """Per-patch divergence over an image at several training steps (notes §6 "image patches").

    One row per step: the image on the left, the (h, w) patch-divergence map overlaid on it on the right,
    one colour scale for all steps so they compare. images: one (H_img, W_img[, C]) array for every step,
    or one per map; values in [0, 1] or uint8. titles: one per step (e.g. "step 1000").
    """
    maps = [np.asarray(m, dtype=float) for m in divergence_maps]
    pictures = [np.asarray(images)] * len(maps) if isinstance(images, np.ndarray) else [np.asarray(i) for i in images]
    if not maps or len(pictures) != len(maps) or len(titles) != len(maps):
        counts = f"{len(pictures)} images, {len(maps)} maps, {len(titles)} titles"
        raise ValueError(f"need one image (or one per map), a title per map and at least one map; got {counts}")
    if any(m.ndim != 2 for m in maps):
        raise ValueError(f"divergence maps must be 2-D (patch rows, patch columns), got {[m.shape for m in maps]}")
    vmin, vmax = min(m.min() for m in maps), max(m.max() for m in maps)
    figure = _new_figure(6, 2.8 * len(maps))
    axes = figure.subplots(len(maps), 2, squeeze=False)
    for (left, right), picture, div, title in zip(axes, pictures, maps, titles):
        extent = (0, picture.shape[1], picture.shape[0], 0)  # patches stretched over the whole image
        cmap = "gray" if picture.ndim == 2 else None
        left.imshow(picture, cmap=cmap)
        _title(left, f"{title}: image", share=0.45)
        right.imshow(picture, cmap=cmap)
        overlay = right.imshow(div, extent=extent, cmap="magma", alpha=0.6, vmin=vmin, vmax=vmax, interpolation="none")
        _title(right, f"{title}: divergence", share=0.4)
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
    figure.colorbar(overlay, ax=axes[:, 1].tolist(), label="distinct experts per patch")
    return _save(figure, path)


def plot_patch_divergence_grid(
    images: Sequence[np.ndarray],
    divergence_maps: Sequence[Sequence[np.ndarray]],
    path: PathLike,
    column_titles: Sequence[str],
) -> Path:
    """Per-patch divergence over several images (rows) at several training steps (columns), notes §6.

    images: n pictures (H_img, W_img[, C]), values in [0, 1] or uint8; divergence_maps[i][s]: the (h, w) patch
    map of image i at step s, drawn over the image (one colour scale for every cell, so steps and images
    compare); column_titles: one per step. The first column shows the plain images.
    """
    pictures = [np.asarray(i) for i in images]
    maps = [[np.asarray(m, dtype=float) for m in row] for row in divergence_maps]
    steps = len(column_titles)
    if not pictures or len(maps) != len(pictures) or any(len(row) != steps for row in maps) or steps == 0:
        shapes = [len(row) for row in maps]
        raise ValueError(
            f"need one row of {steps} maps per image and at least one image and step; got {len(pictures)} images, "
            f"map rows of lengths {shapes}"
        )
    if any(m.ndim != 2 for row in maps for m in row):
        raise ValueError("divergence maps must be 2-D (patch rows, patch columns)")
    vmin, vmax = min(m.min() for row in maps for m in row), max(m.max() for row in maps for m in row)
    figure = _new_figure(1.6 * (steps + 1) + 1, max(2.8, 1.6 * len(pictures) + 0.6))  # room for the colour bar's label
    axes = figure.subplots(len(pictures), steps + 1, squeeze=False)
    overlay = None
    for r, (picture, row) in enumerate(zip(pictures, maps)):
        cmap = "gray" if picture.ndim == 2 else None
        axes[r, 0].imshow(picture, cmap=cmap)
        for c, div in enumerate(row, start=1):
            extent = (0, picture.shape[1], picture.shape[0], 0)
            axes[r, c].imshow(picture, cmap=cmap)
            top = max(vmax, vmin + 1e-9)
            overlay = axes[r, c].imshow(
                div, extent=extent, cmap="magma", alpha=0.65, vmin=vmin, vmax=top, interpolation="none"
            )
    for c, title in enumerate(["image", *column_titles]):
        _title(axes[0, c], title, share=0.85 / (steps + 1), fontsize=9)
    for ax in axes.reshape(-1):
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(overlay, ax=axes[:, 1:].reshape(-1).tolist(), label="distinct experts per patch", shrink=0.8)
    return _save(figure, path)


__all__ = [
    "plot_activation_heatmap",
    "plot_curves",
    "plot_divergence_histogram",
    "plot_head_usage",
    "plot_language_usage",
    "plot_patch_divergence",
    "plot_patch_divergence_grid",
]
