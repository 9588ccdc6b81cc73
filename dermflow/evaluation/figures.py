"""The run report's figures: matplotlib (Agg) charts rendered straight to PNG bytes.

Each function takes plain numbers and labels (no data frames, no models) and returns the PNG.
Figures are built as `matplotlib.figure.Figure` objects on an Agg canvas, never through
`pyplot`: pyplot keeps a global registry of open figures and is not thread-safe, while Prefect
runs tasks in threads. The one shared piece, `rcParams` (our style), is applied under a lock.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
# One style for every figure: readable fonts, light grid, no top/right spines.
STYLE: dict = {
    "font.family": "DejaVu Sans",
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 15,
    "figure.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.axisbelow": True,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}
PALETTE = matplotlib.colormaps["tab10"].colors
RANGE_COLORS = {"I-II": "#f3d7c2", "III-IV": "#c99a6e", "V-VI": "#6b4423", "unknown": "#9e9e9e"}
_STYLE_LOCK = threading.RLock()


@contextmanager
def figure_style() -> Iterator[None]:
    """Apply the report style for the duration (serialized: rcParams is process-global)."""
    with _STYLE_LOCK, matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def to_png(figure: Figure) -> bytes:
    """Render and release the figure; returns PNG bytes."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    finally:
        figure.clear()
    return buffer.getvalue()


def colors_for(names: Sequence[str]) -> dict[str, tuple]:
    """A stable colour per architecture (order of first appearance)."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def shorten(text: str, width: int = 32) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _no_data(axes, message: str = "no data") -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, color="#777")
    axes.set_xticks([])
    axes.set_yticks([])
    axes.grid(False)


# --- architectures ---------------------------------------------------------------------------
def metric_bars(
    values: Mapping[str, float | None],
    *,
    title: str,
    ylabel: str,
    colors: Mapping[str, tuple],
    best: str | None = None,
) -> bytes:
    """One bar per architecture; `None` (a failed architecture) is drawn as a labelled gap."""
    with figure_style():
        names = list(values)
        figure = new_figure(max(6.0, 1.1 * len(names) + 3), 4.6)
        axes = figure.add_subplot()
        heights = [values[n] if values[n] is not None else 0.0 for n in names]
        bars = axes.bar(names, heights, color=[colors.get(n, "#888") for n in names], edgecolor="#333")
        for bar, name in zip(bars, names):
            value = values[name]
            label = "failed" if value is None else f"{value:.3f}"
            weight = "bold" if name == best else "normal"
            axes.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          xytext=(0, 3), textcoords="offset points", ha="center", fontweight=weight)
            if name == best:
                bar.set_linewidth(2.5)
        axes.set_ylim(0, max(heights) * 1.18 if max(heights, default=0) > 0 else 1)
        axes.set_title(title)
        axes.set_ylabel(ylabel)
        axes.set_xlabel("architecture" + (f" (best: {best}, thick outline)" if best else ""))
        axes.tick_params(axis="x", rotation=20 if len(names) > 4 else 0)
        return to_png(figure)


def top_k_chart(top_k: Mapping[str, Sequence[float]], colors: Mapping[str, tuple]) -> bytes:
    """Top-k accuracy for k = 1..len(values), one line per architecture."""
    with figure_style():
        figure = new_figure(7.5, 4.8)
        axes = figure.add_subplot()
        if not top_k:
            _no_data(axes)
        for name, values in top_k.items():
            ks = np.arange(1, len(values) + 1)
            axes.plot(ks, values, marker="o", lw=2, label=name, color=colors.get(name))
            axes.annotate(f"{values[-1]:.2f}", (ks[-1], values[-1]), xytext=(6, 0),
                          textcoords="offset points", va="center", fontsize=9)
        axes.set_xticks(range(1, 6))
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("k (true label among the k most probable)")
        axes.set_ylabel("top-k accuracy (test)")
        axes.set_title("Top-k accuracy per architecture")
        if top_k:
            axes.legend(loc="lower right")
        return to_png(figure)


def per_range_chart(
    per_range: Mapping[str, Mapping[str, Mapping[str, float]]],
    gaps: Mapping[str, float | None],
    colors: Mapping[str, tuple],
    range_order: Sequence[str],
) -> bytes:
    """Accuracy and weighted F1 per Fitzpatrick range, grouped bars per architecture."""
    with figure_style():
        names = list(per_range)
        ranges = [r for r in range_order if any(r in per_range[n] for n in names)]
        figure = new_figure(13, 4.8)
        for index, (metric, label) in enumerate([("accuracy", "Accuracy"), ("weighted_f1", "Weighted F1")]):
            axes = figure.add_subplot(1, 2, index + 1)
            if not names or not ranges:
                _no_data(axes)
                continue
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                xs = np.arange(len(ranges)) + (i - (len(names) - 1) / 2) * width
                ys = [per_range[name].get(r, {}).get(metric, np.nan) for r in ranges]
                gap = gaps.get(name)
                legend = f"{name} (gap {gap:.3f})" if (metric == "weighted_f1" and gap is not None) else name
                axes.bar(xs, ys, width=width, color=colors.get(name), edgecolor="#333", label=legend)
            counts = [max((per_range[n].get(r, {}).get("n", 0) for n in names), default=0) for r in ranges]
            axes.set_xticks(range(len(ranges)), [f"{r}\n(n={c})" for r, c in zip(ranges, counts)])
            axes.set_ylim(0, 1.0)
            axes.set_xlabel("Fitzpatrick skin-type range (test rows)")
            axes.set_ylabel(f"{label} (test)")
            axes.set_title(f"{label} by skin-type range")
            axes.legend(fontsize=8.5, loc="upper right",
                        title="best−worst gap, known ranges" if metric == "weighted_f1" else None,
                        title_fontsize=8.5)
        return to_png(figure)


# --- confusion ------------------------------------------------------------------------------
def confusion_heatmap(
    normalized: np.ndarray,
    labels: Sequence[str],
    *,
    title: str,
    groups: Sequence[str] | None = None,
) -> bytes:
    """Row-normalized confusion matrix over many labels (114 stay readable: big canvas, small ticks).

    `groups`, aligned with `labels` (already ordered so that groups are contiguous), draws
    separators and group names.
    """
    n = len(labels)
    with figure_style():
        side = max(8.0, 0.2 * n + 6)
        figure = new_figure(side + 1.5, side)
        axes = figure.add_subplot()
        axes.grid(False)
        masked = np.ma.masked_invalid(normalized)
        image = axes.imshow(masked, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
        tick_size = 11 if n <= 20 else 9 if n <= 60 else 8
        short = [shorten(label, 34) for label in labels]
        axes.set_xticks(range(n), short, rotation=90, fontsize=tick_size)
        axes.set_yticks(range(n), short, fontsize=tick_size)
        axes.set_xlabel("predicted label", fontsize=13)
        axes.set_ylabel("true label", fontsize=13)
        axes.set_title(title, fontsize=16, pad=14)
        # light gridlines between cells so rows can be followed across the canvas
        axes.set_xticks(np.arange(-0.5, n, 1), minor=True)
        axes.set_yticks(np.arange(-0.5, n, 1), minor=True)
        axes.grid(which="minor", color="#e6e6e6", linewidth=0.3)
        axes.tick_params(which="minor", length=0)
        if groups is not None and n:
            starts = [i for i in range(n) if i == 0 or groups[i] != groups[i - 1]]
            for start in starts[1:]:
                axes.axhline(start - 0.5, color="#c0392b", lw=1.0)
                axes.axvline(start - 0.5, color="#c0392b", lw=1.0)
            ends = starts[1:] + [n]
            for start, end in zip(starts, ends):
                axes.text(n + 0.5, (start + end - 1) / 2, shorten(str(groups[start]), 22), va="center",
                          ha="left", fontsize=tick_size + 1, color="#c0392b", fontweight="bold")
        colorbar = figure.colorbar(image, ax=axes, fraction=0.03, pad=0.12 if groups is not None else 0.02)
        colorbar.set_label("share of the true label's test rows")
        return to_png(figure)


def confusion_small(counts: np.ndarray, row_labels: Sequence[str], column_labels: Sequence[str], title: str) -> bytes:
    """Counts and row-normalized shares side by side, every cell annotated."""
    with figure_style():
        totals = counts.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)
        figure = new_figure(16, 6.6)
        figure.suptitle(title)
        panels = [(counts, "counts", "Oranges", None, "{:.0f}"), (shares, "normalized per true label", "Blues", 1.0, "{:.2f}")]
        for index, (matrix, subtitle, cmap, vmax, fmt) in enumerate(panels):
            axes = figure.add_subplot(1, 2, index + 1)
            axes.grid(False)
            image = axes.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
            top = np.nanmax(matrix) if np.isfinite(matrix).any() else 1
            for (r, c), value in np.ndenumerate(matrix):
                if np.isfinite(value):
                    axes.text(c, r, fmt.format(value), ha="center", va="center", fontsize=10,
                              color="white" if value > 0.6 * top else "#222")
            axes.set_xticks(range(len(column_labels)), [shorten(x, 20) for x in column_labels], rotation=30, ha="right")
            axes.set_yticks(range(len(row_labels)), [shorten(x, 26) for x in row_labels] if index == 0 else [])
            axes.set_xlabel("predicted label")
            if index == 0:
                axes.set_ylabel("true label")
            axes.set_title(subtitle)
            figure.colorbar(image, ax=axes, fraction=0.046, pad=0.03)
        return to_png(figure)


# --- calibration ----------------------------------------------------------------------------
def reliability_diagram(
    bin_edges: np.ndarray, bin_accuracy: np.ndarray, bin_confidence: np.ndarray, bin_count: np.ndarray,
    ece: float, title: str,
) -> bytes:
    """Accuracy vs confidence per bin, with the diagonal and a histogram of confidences."""
    with figure_style():
        figure = new_figure(7.5, 7.5)
        grid = figure.add_gridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
        axes = figure.add_subplot(grid[0])
        hist = figure.add_subplot(grid[1], sharex=axes)
        centers = (bin_edges[:-1] + bin_edges[1:]) / 2
        width = np.diff(bin_edges)
        has = bin_count > 0
        axes.bar(centers[has], bin_accuracy[has], width=width[has], color="#4c72b0", edgecolor="#222", label="accuracy in bin")
        # each bin's mean confidence as a marker: where it sits above the bar the model is overconfident
        axes.plot(centers[has], bin_confidence[has], "D", color="#c0392b", markersize=6,
                  label="mean confidence in bin")
        axes.vlines(centers[has], np.minimum(bin_accuracy, bin_confidence)[has],
                    np.maximum(bin_accuracy, bin_confidence)[has], color="#c0392b", lw=1.5)
        axes.plot([0, 1], [0, 1], "--", color="#333", label="perfect calibration")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_ylabel("accuracy")
        axes.set_title(title)
        axes.text(0.04, 0.93, f"ECE = {ece:.3f}", transform=axes.transAxes, fontsize=13, fontweight="bold",
                  bbox={"facecolor": "white", "edgecolor": "#999"})
        axes.legend(loc="lower right")
        axes.tick_params(labelbottom=False)
        hist.bar(centers, bin_count, width=width, color="#8c8c8c", edgecolor="#222")
        hist.set_xlabel("confidence (top-1 probability)")
        hist.set_ylabel("rows")
        return to_png(figure)


# --- training and tuning --------------------------------------------------------------------
HISTORY_PANELS = (
    ("loss", "loss", "val_loss", "loss"),
    ("accuracy", "accuracy", "val_accuracy", "accuracy"),
    ("weighted F1 (validation)", None, "val_weighted_f1", "weighted F1"),
)


def training_curves(histories: Mapping[str, Mapping[str, Sequence[float]]], colors: Mapping[str, tuple]) -> bytes:
    """Loss, accuracy and validation weighted F1 per epoch; solid = train, dashed = validation."""
    with figure_style():
        figure = new_figure(17, 4.8)
        for index, (title, train_key, val_key, ylabel) in enumerate(HISTORY_PANELS):
            axes = figure.add_subplot(1, 3, index + 1)
            drawn = False
            for name, history in histories.items():
                color = colors.get(name)
                for key, style, suffix in ((train_key, "-", "train"), (val_key, "--", "val")):
                    values = history.get(key) if key else None
                    if values:
                        # history.json writes NaN as null
                        values = np.array([np.nan if v is None else v for v in values], dtype=float)
                        epochs = np.arange(1, len(values) + 1)
                        axes.plot(epochs, values, style, color=color, lw=2, marker="o" if len(values) < 15 else None,
                                  markersize=4, label=f"{name} ({suffix})")
                        drawn = True
            if not drawn:
                _no_data(axes, "not recorded")
            else:
                axes.legend(fontsize=8)
                axes.xaxis.get_major_locator().set_params(integer=True)
            axes.set_title(title)
            axes.set_xlabel("epoch")
            axes.set_ylabel(ylabel)
        return to_png(figure)


def tuning_chart(trials: Sequence[Mapping], numeric_hyperparameters: Sequence[str]) -> bytes:
    """Score per trial (best marked), then score against each numeric hyperparameter."""
    panels = 1 + min(len(numeric_hyperparameters), 3)
    with figure_style():
        figure = new_figure(5.2 * panels, 4.6)
        scores = np.array([t["score"] if t.get("score") is not None else np.nan for t in trials], dtype=float)
        axes = figure.add_subplot(1, panels, 1)
        xs = np.arange(1, len(trials) + 1)
        axes.plot(xs, scores, "o-", color=PALETTE[0], lw=1.5)
        if np.isfinite(scores).any():
            best = int(np.nanargmax(scores))
            axes.plot(xs[best], scores[best], "*", color="#c0392b", markersize=18, label=f"best: trial {trials[best].get('trial_id', best + 1)}")
            axes.plot(xs, np.fmax.accumulate(np.where(np.isfinite(scores), scores, -np.inf)), color="#999", lw=1,
                      drawstyle="steps-post", label="best so far")
            axes.legend(loc="lower right")
        axes.set_xlabel("trial (in order run)")
        axes.set_ylabel("objective score")
        axes.set_title("Tuning: score per trial")
        for index, name in enumerate(numeric_hyperparameters[:3]):
            axes = figure.add_subplot(1, panels, index + 2)
            values = np.array([float(t["hyperparameters"].get(name, np.nan)) for t in trials], dtype=float)
            axes.scatter(values, scores, color=PALETTE[index + 1], s=40, edgecolor="#222")
            positive = values[np.isfinite(values)]
            if len(positive) and (positive > 0).all() and positive.max() / positive.min() >= 50:
                axes.set_xscale("log")  # learning rates and the like span decades
            axes.set_xlabel(shorten(name, 30))
            axes.set_ylabel("objective score")
            axes.set_title(f"score vs {shorten(name, 22)}")
        return to_png(figure)


# --- data -----------------------------------------------------------------------------------
def fetch_outcomes_chart(ok: int, failed_by_reason: Mapping[str, int]) -> bytes:
    """Horizontal bars: fetched ok, then each failure reason, largest first."""
    with figure_style():
        items = [("ok", ok)] + sorted(failed_by_reason.items(), key=lambda kv: -kv[1])
        figure = new_figure(9, max(3.0, 0.42 * len(items) + 1.5))
        axes = figure.add_subplot()
        names = [k for k, _ in items][::-1]
        values = [v for _, v in items][::-1]
        colors = ["#2e8b57" if n == "ok" else "#c0392b" for n in names]
        axes.barh(names, values, color=colors, edgecolor="#333")
        top = max(values, default=0)
        for y, value in enumerate(values):
            axes.text(value + top * 0.01, y, f"{value:,}", va="center", fontsize=10)
        axes.set_xlim(0, top * 1.15 if top else 1)
        axes.set_xlabel("dataset rows")
        axes.set_ylabel("fetch outcome")
        axes.set_title("Image fetch outcomes by reason")
        return to_png(figure)


def split_by_range_chart(split_by_range: Mapping[str, Mapping[str, int]], range_order: Sequence[str]) -> bytes:
    """Stacked bars: rows per split, coloured by Fitzpatrick range."""
    with figure_style():
        splits = list(split_by_range)
        figure = new_figure(max(7.0, 1.4 * len(splits) + 3), 4.8)
        axes = figure.add_subplot()
        ranges = [r for r in range_order if any(r in split_by_range[s] for s in splits)]
        ranges += sorted({r for s in splits for r in split_by_range[s]} - set(ranges))
        bottom = np.zeros(len(splits))
        for r in ranges:
            values = np.array([split_by_range[s].get(r, 0) for s in splits], dtype=float)
            axes.bar(splits, values, bottom=bottom, label=r, color=RANGE_COLORS.get(r, "#bbb"), edgecolor="#333")
            bottom += values
        for x, total in enumerate(bottom):
            axes.text(x, total, f"{int(total):,}", ha="center", va="bottom", fontsize=10)
        axes.set_ylim(0, bottom.max() * 1.12 if len(bottom) and bottom.max() > 0 else 1)
        axes.set_xlabel("split")
        axes.set_ylabel("rows")
        axes.set_title("Split sizes by Fitzpatrick range")
        axes.legend(title="range", loc="upper right")
        return to_png(figure)


# --- example thumbnails ---------------------------------------------------------------------
@dataclass
class Thumbnail:
    """One example image: RGB array (None when unavailable), optional heatmap in [0,1], caption."""

    image: np.ndarray | None
    caption: str
    heatmap: np.ndarray | None = None
    correct: bool = False


def thumbnail_gallery(rows: Sequence[tuple[str, Sequence[Thumbnail]]], *, title: str, columns: int) -> bytes:
    """A grid of thumbnails, one row per group (e.g. one frequent confusion), row title above it.

    A heatmap, when given, is overlaid with a jet colormap at partial opacity (Grad-CAM style).
    """
    columns = max(1, columns)
    cell = 2.6
    # most clinical photos are landscape (about 4:3); taller ones are shown a little smaller
    row_height = 0.78 * cell + 1.15  # image, three caption lines, the next row's title
    height = row_height * max(1, len(rows)) + 0.7
    with figure_style():
        figure = new_figure(max(cell * columns, 9.0), height)
        figure.suptitle(title, y=1 - 0.12 / height, fontsize=13)
        grid = figure.add_gridspec(max(1, len(rows)), columns, hspace=0.45, wspace=0.08,
                                   top=1 - 0.95 / height, bottom=0.45 / height, left=0.02, right=0.98)
        jet = matplotlib.colormaps["jet"]
        for r, (group_title, thumbs) in enumerate(rows):
            for c in range(columns):
                axes = figure.add_subplot(grid[r, c])
                axes.set_xticks([])
                axes.set_yticks([])
                axes.grid(False)
                if c == 0 and group_title:
                    # above the grid cell, not the axes: an axes shrinks to its image's aspect
                    cell_box = grid[r, 0].get_position(figure)
                    figure.text(cell_box.x0, cell_box.y1 + 0.08 / height, group_title, ha="left", va="bottom",
                                fontsize=10.5, fontweight="bold", color="#1f3b57")
                if c >= len(thumbs):
                    axes.set_axis_off()
                    continue
                thumb = thumbs[c]
                if thumb.image is None:
                    axes.imshow(np.full((8, 8, 3), 0.92))
                    axes.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", transform=axes.transAxes,
                              color="#777", fontsize=9)
                else:
                    axes.imshow(thumb.image)
                    if thumb.heatmap is not None:
                        # opacity follows the heat, so cold regions show the skin unaltered
                        h, w = thumb.image.shape[:2]
                        overlay = jet(thumb.heatmap)
                        overlay[..., 3] = 0.6 * thumb.heatmap
                        axes.imshow(overlay, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
                for spine in axes.spines.values():
                    spine.set_visible(True)
                    spine.set_color("#2e8b57" if thumb.correct else "#c0392b")
                    spine.set_linewidth(2.5)
                axes.set_xlabel(thumb.caption, fontsize=8, labelpad=3)
        return to_png(figure)


def decode_thumbnail(data: bytes, size: int = 256) -> np.ndarray:
    """Image bytes -> RGB uint8 array at most `size` pixels on its long side (JPEG decoded at reduced scale)."""
    from dermflow.ingestion.images import open_image

    with open_image(data) as image:  # the pixel cap, before anything is decoded
        image.draft("RGB", (size, size))  # JPEG: decode at 1/2..1/8 scale, much faster
        image = image.convert("RGB")
        image.thumbnail((size, size))
        return np.asarray(image)


def resize_heatmap(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Any-size heatmap -> `shape` (h, w), clipped to [0, 1]."""
    from PIL import Image

    heatmap = np.nan_to_num(np.asarray(heatmap, dtype=np.float32).squeeze(), nan=0.0)
    if heatmap.ndim != 2:
        raise ValueError(f"saliency heatmap must be 2-D; got shape {heatmap.shape}")
    resized = Image.fromarray(heatmap).resize((shape[1], shape[0]), Image.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)

