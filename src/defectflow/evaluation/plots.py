"""Pictures people look at: sample grids, confusion matrix, training curves, reliability
diagram, accuracy versus coverage, anomaly scores, error analysis, grouped bars.

Each chart is a matplotlib `Figure` built by a `*_figure` function and drawn by the matching
`*_image` function into an RGB uint8 array, which is what callers save (`save_rgb`) and the
report embeds. Figures are made with `matplotlib.figure.Figure` and drawn on an Agg canvas:
no display, no pyplot figure manager, so nothing stays open between calls (the `*_image`
functions also clear their figure once drawn). Class names and captions are never shortened:
a figure is sized from the number and the length of the texts it shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from defectflow.inference.postprocessing import overlay
from defectflow.inference.preprocessing import read_image, read_mask

#: Pixels per inch of every figure: a `size` in pixels is the size of the array returned.
DPI = 100
#: Points of the texts in figures (titles one point more).
FONT_SIZE = 9
# RGB 0-255: the mask overlays are drawn into the image arrays with OpenCV.
TRUE_COLOR, PREDICTED_COLOR, WRONG_COLOR = (0, 170, 0), (230, 30, 30), (200, 0, 0)
CURVE_COLOR, OPERATING_COLOR, TARGET_COLOR = (31, 119, 180), (230, 30, 30), (44, 160, 44)
GOOD_COLOR, DEFECT_COLOR = (0, 170, 0), (200, 0, 0)
GRAY = (120, 120, 120)
#: The colours of successive series (matplotlib's tab10, RGB 0-255).
SERIES_COLORS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
)


def _mpl(color: tuple[int, int, int]) -> tuple[float, float, float]:
    """An RGB 0-255 colour as matplotlib takes it (0-1)."""
    return color[0] / 255, color[1] / 255, color[2] / 255


def new_figure(width_in: float, height_in: float) -> Figure:
    """A figure of that size in inches (at `DPI`), laid out by constrained layout so that
    titles, tick labels and legends are kept inside it."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.06, h_pad=0.06)
    return fig


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Draw `fig` on an Agg canvas: its pixels, RGB uint8 (height x width x 3)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _image(fig: Figure) -> np.ndarray:
    """`figure_to_rgb`, then the figure cleared so that its artists and image tiles are freed
    at once rather than at the next garbage collection."""
    try:
        return figure_to_rgb(fig)
    finally:
        fig.clear()


def text_width_in(texts: Sequence[str], size: float = FONT_SIZE) -> float:
    """Width in inches of the widest of `texts` (each may have several lines) at `size` points."""
    fig = Figure(dpi=DPI)
    renderer = FigureCanvasAgg(fig).get_renderer()
    widest = max(
        (fig.text(0, 0, t, fontsize=size).get_window_extent(renderer).width for t in texts if t),
        default=0.0,
    )
    return widest / DPI


def _no_data(ax, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        color=_mpl(GRAY),
        fontsize=FONT_SIZE + 1,
    )


# ---------------------------------------------------------------- image grids


def _tile(image: np.ndarray, tile_size: int) -> np.ndarray:
    """The image shrunk (or grown) to a tile: what the figure holds instead of the full image."""
    interpolation = cv2.INTER_AREA if max(image.shape[:2]) > tile_size else cv2.INTER_LINEAR
    return cv2.resize(image.astype(np.uint8), (tile_size, tile_size), interpolation=interpolation)


def _show(ax, tile: np.ndarray) -> None:
    ax.imshow(tile, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def image_grid_figure(
    tiles: list[np.ndarray],
    captions: list[list[str]],
    columns: int = 4,
    tile_size: int = 160,
    title: str = "",
) -> Figure:
    """RGB tiles in a grid, each captioned (whole) under it; a column is as wide as its widest
    caption needs."""
    if not tiles:
        raise ValueError("image_grid needs at least one tile")
    if len(tiles) != len(captions):
        raise ValueError(f"{len(tiles)} tiles but {len(captions)} captions")
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    lines = max(len(c) for c in captions)
    texts = ["\n".join(c) for c in captions]
    cell_w = max(tile_size / DPI, text_width_in(texts, FONT_SIZE - 1)) + 0.15
    cell_h = tile_size / DPI + lines * (FONT_SIZE + 2) / 72 + 0.15
    fig = new_figure(columns * cell_w + 0.1, rows * cell_h + (0.35 if title else 0.1))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, tile, text in zip(axes.flat, tiles, texts, strict=False):
        _show(ax, _tile(tile, tile_size))
        ax.set_xlabel(text, fontsize=FONT_SIZE - 1, labelpad=3)
    for ax in axes.flat[len(tiles) :]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=FONT_SIZE + 1)
    return fig


def image_grid(
    tiles: list[np.ndarray],
    captions: list[list[str]],
    columns: int = 4,
    tile_size: int = 160,
    title: str = "",
) -> np.ndarray:
    """RGB tiles with captions under each, in a grid (RGB uint8)."""
    return _image(image_grid_figure(tiles, captions, columns, tile_size, title))


def _outlined(image: np.ndarray, mask: np.ndarray, color, tile_size: int) -> np.ndarray:
    """The mask filled over the image plus its outline, thick enough to survive the shrink to
    a tile (a defect can be a few pixels of a megapixel image)."""
    out = overlay(image, mask, color, 0.45)
    thickness = max(1, round(2 * max(mask.shape) / tile_size))
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    cv2.drawContours(out, contours, -1, color, thickness)
    return out


#: The three tiles of an error-analysis panel: title and colour.
ERROR_PANELS = (
    ("image", (0, 0, 0)),
    ("true mask", TRUE_COLOR),
    ("predicted mask", PREDICTED_COLOR),
)


def _case_captions(row: dict) -> tuple[str, str]:
    confidence = f" ({row['confidence']:.2f})" if "confidence" in row else ""
    first = f"true {row['true']} -> predicted {row['predicted']}{confidence}"
    second = f"Dice {row['dice']:.2f}   " + "/".join(Path(row["path"]).parts[-2:])
    return first, second


def error_analysis_figure(
    cases: list[tuple[dict, np.ndarray]], tile_size: int = 200, columns: int = 2
) -> Figure:
    """One panel per case, in the order given: image | true mask | predicted mask, each mask
    over the image, captioned with true and predicted class (red when they differ),
    confidence, Dice and file.

    `cases`: (per-image evaluation row, predicted mask uint8 {0, 1}). The image is re-read
    from the row's `path` and the true mask from its `mask_path` (none: a good image).
    """
    if not cases:
        raise ValueError("error_analysis_grid needs at least one case")
    panels = []
    for row, predicted in cases:
        image = read_image(row["path"])
        truth = (
            read_mask(row["mask_path"])
            if row.get("mask_path")
            else np.zeros(image.shape[:2], np.uint8)
        )
        hw = image.shape[1], image.shape[0]
        truth = (
            truth
            if truth.shape == image.shape[:2]
            else cv2.resize(truth, hw, interpolation=cv2.INTER_NEAREST)
        )
        if predicted.shape != image.shape[:2]:
            predicted = cv2.resize(predicted.astype(np.uint8), hw, interpolation=cv2.INTER_NEAREST)
        tiles = [
            _tile(image, tile_size),
            _tile(_outlined(image, truth, TRUE_COLOR, tile_size), tile_size),
            _tile(_outlined(image, predicted, PREDICTED_COLOR, tile_size), tile_size),
        ]
        panels.append((row, tiles, _case_captions(row)))
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    captions = [text for _, _, pair in panels for text in pair]
    panel_w = max(3 * tile_size / DPI + 0.4, text_width_in(captions, FONT_SIZE + 1) + 0.3)
    panel_h = tile_size / DPI + 0.8
    fig = new_figure(columns * panel_w, rows * panel_h + 0.35)
    fig.suptitle(
        "Worst cases: image | true mask (green) | predicted mask (red)", fontsize=FONT_SIZE + 2
    )
    subfigures = np.atleast_1d(fig.subfigures(rows, columns, squeeze=False)).ravel()
    for subfigure, (row, tiles, (first, second)) in zip(subfigures, panels, strict=False):
        wrong = row["true"] != row["predicted"]
        subfigure.suptitle(
            first, fontsize=FONT_SIZE + 1, color=_mpl(WRONG_COLOR) if wrong else "black"
        )
        subfigure.supxlabel(second, fontsize=FONT_SIZE, color=_mpl(GRAY))
        for ax, tile, (name, color) in zip(
            subfigure.subplots(1, 3), tiles, ERROR_PANELS, strict=True
        ):
            _show(ax, tile)
            ax.set_title(name, fontsize=FONT_SIZE, color=_mpl(color))
    return fig


def error_analysis_grid(
    cases: list[tuple[dict, np.ndarray]], tile_size: int = 200, columns: int = 2
) -> np.ndarray:
    """`error_analysis_figure` drawn (RGB uint8)."""
    return _image(error_analysis_figure(cases, tile_size, columns))


# ---------------------------------------------------------------- classification


def confusion_matrix_figure(matrix: list[list[int]], classes: list[str]) -> Figure:
    """Image counts per true class (rows) and predicted class (columns), drawn by
    scikit-learn's `ConfusionMatrixDisplay`; a cell's shade is its share of the true class's
    images, so a rare class reads as well as a common one. Class names whole, the predicted
    ones at 45 degrees; the figure grows with the number and the length of the names."""
    from sklearn.metrics import ConfusionMatrixDisplay

    counts = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"a {counts.shape} matrix for {n} classes")
    title = "Confusion matrix: images per true and predicted class"
    name_in = text_width_in(classes)
    cell = max(0.55, text_width_in([str(counts.max(initial=0))]) + 0.25)
    legend = "share of the true class's images"
    side = max(
        n * cell, text_width_in([legend], FONT_SIZE - 1) + 0.3
    )  # the colour bar's label fits
    width = max(name_in + side + 1.9, text_width_in([title], FONT_SIZE + 1) + 0.4)
    height = side + 0.71 * name_in + 1.1
    fig = new_figure(width, height)
    ax = fig.add_subplot()
    display = ConfusionMatrixDisplay(counts, display_labels=list(classes))
    display.plot(ax=ax, cmap="Blues", values_format="d", colorbar=False, xticks_rotation=45)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    display.im_.set_data(share)
    display.im_.set_clim(0.0, 1.0)
    for (i, j), text in np.ndenumerate(display.text_):
        text.set_color("white" if share[i, j] > 0.5 else "black")
        text.set_fontsize(FONT_SIZE)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")
    ax.tick_params(labelsize=FONT_SIZE)
    ax.set_xlabel("predicted class", fontsize=FONT_SIZE)
    ax.set_ylabel("true class", fontsize=FONT_SIZE)
    fig.suptitle(title, fontsize=FONT_SIZE + 1)
    colorbar = fig.colorbar(display.im_, ax=ax, fraction=0.08, shrink=0.9)
    colorbar.set_label(legend, fontsize=FONT_SIZE - 1)
    colorbar.ax.tick_params(labelsize=FONT_SIZE - 1)
    return fig


def confusion_matrix_image(matrix: list[list[int]], classes: list[str]) -> np.ndarray:
    """`confusion_matrix_figure` drawn (RGB uint8)."""
    return _image(confusion_matrix_figure(matrix, classes))


def curves_figure(
    history: dict[str, list[float]], keys: list[str], size=(640, 360), title: str = ""
) -> Figure:
    """Training history series (e.g. loss and val_loss) per epoch, one line per key present;
    the legend under the plot, so it never hides a curve. `size`: pixels."""
    series = [(k, np.asarray(history[k], dtype=np.float64)) for k in keys if history.get(k)]
    fig = new_figure(size[0] / DPI, size[1] / DPI)
    ax = fig.add_subplot()
    ax.set_title(
        f"Training curves: {title or ', '.join(k for k, _ in series) or 'none'}",
        fontsize=FONT_SIZE + 1,
    )
    ax.set_xlabel("epoch", fontsize=FONT_SIZE)
    ax.set_ylabel(title or "value", fontsize=FONT_SIZE)
    ax.tick_params(labelsize=FONT_SIZE)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if not series:
        _no_data(ax, "no training history recorded")
        return fig
    for idx, (key, values) in enumerate(series):
        epochs = np.arange(1, len(values) + 1)
        ax.plot(
            epochs,
            values,
            label=key,
            color=_mpl(SERIES_COLORS[idx % len(SERIES_COLORS)]),
            linewidth=1.6,
            marker="o" if len(values) <= 30 else None,
            markersize=3,
        )
    longest = max(len(v) for _, v in series)
    ax.set_xlim(0.8, longest + 0.2)
    fig.legend(loc="outside lower center", ncols=2, fontsize=FONT_SIZE - 1, frameon=False)
    return fig


def curves_image(
    history: dict[str, list[float]], keys: list[str], size=(640, 360), title: str = ""
) -> np.ndarray:
    """`curves_figure` drawn (RGB uint8, `size` = (width, height) pixels)."""
    return _image(curves_figure(history, keys, size, title))


# ---------------------------------------------------------------- confidence


def reliability_diagram_figure(
    bins: list[dict] | None, ece: float | None, size: int = 480
) -> Figure:
    """Above: accuracy per confidence bin (bars) against perfect calibration (the diagonal),
    each bin's mean confidence and accuracy as a point of the calibration curve, the ECE in
    the title. Below: the images in each bin. `size`: pixels a side.

    `bins`: from `defectflow.evaluation.metrics.reliability_bins`; None when there are no confidences.
    """
    from sklearn.calibration import CalibrationDisplay

    fig = new_figure(size / DPI, size / DPI)
    ax, counts_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ece_text = "n/a" if ece is None or math.isnan(ece) else f"{ece:.3f}"
    filled = [b for b in bins or [] if b["count"]]
    lower = [b["lower"] for b in filled]
    widths = [b["upper"] - b["lower"] for b in filled]
    bar_style = {
        "align": "edge",
        "color": (0.55, 0.72, 0.88),
        "edgecolor": (0.12, 0.24, 0.47),
        "linewidth": 0.8,
    }
    if filled:
        ax.bar(
            lower,
            [b["accuracy"] for b in filled],
            width=widths,
            label="accuracy of the bin",
            **bar_style,
        )
        # CalibrationDisplay from the stored bins, not from_predictions: an evaluation keeps the
        # bins (a champion's or an older evaluation may have no per-image confidences), and
        # these are the pairs calibration_curve would give with uniform bins, except that its
        # bins are closed on the right while ours (and the ECE in the title) are closed on the
        # left. y_prob only feeds its histogram, which is not drawn here.
        CalibrationDisplay(
            np.array([b["accuracy"] for b in filled]),
            np.array([b["confidence"] for b in filled]),
            None,
        ).plot(
            ax=ax,
            name="mean confidence, accuracy",
            ref_line=True,
            color=_mpl(SERIES_COLORS[1]),
            marker="o",
            markersize=4,
        )
        count_bars = counts_ax.bar(lower, [b["count"] for b in filled], width=widths, **bar_style)
        counts_ax.bar_label(count_bars, padding=2, fontsize=FONT_SIZE - 2)
        counts_ax.set_ylim(0, max(b["count"] for b in filled) * 1.35)
    else:
        ax.plot([0, 1], [0, 1], "k:", label="Perfectly calibrated")
        _no_data(ax, "no confidences recorded")
    ticks = np.linspace(0.0, 1.0, 6)
    ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.05), xticks=ticks, yticks=ticks)
    ax.set_xlabel("")
    ax.set_ylabel("accuracy", fontsize=FONT_SIZE)
    ax.set_title(f"Reliability diagram (top label), ECE = {ece_text}", fontsize=FONT_SIZE + 1)
    ax.legend(loc="best", fontsize=FONT_SIZE - 1)
    ax.tick_params(labelsize=FONT_SIZE, labelbottom=False)
    counts_ax.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
    counts_ax.set_xlabel("confidence (probability of the class answered)", fontsize=FONT_SIZE)
    counts_ax.set_ylabel("images", fontsize=FONT_SIZE)
    counts_ax.tick_params(labelsize=FONT_SIZE)
    for axes in (ax, counts_ax):
        axes.grid(alpha=0.3)
    return fig


def reliability_diagram_image(
    bins: list[dict] | None, ece: float | None, size: int = 480
) -> np.ndarray:
    """`reliability_diagram_figure` drawn (RGB uint8, `size` x `size` pixels)."""
    return _image(reliability_diagram_figure(bins, ece, size))


def operating_point(curve: list[dict], threshold: float) -> dict | None:
    """The point of an accuracy-versus-coverage curve (`defectflow.evaluation.calibration.coverage_curve`)
    that `threshold` selects: what it accepts is what the point with the smallest curve
    threshold >= it accepts; None when it accepts nothing."""
    above = [p for p in curve if p["threshold"] >= threshold]
    return min(above, key=lambda p: p["threshold"]) if above else None


def coverage_curve_figure(
    curve: list[dict] | None,
    threshold: float | None = None,
    target: float | None = None,
    size: tuple[int, int] = (520, 400),
) -> Figure:
    """Accuracy of the accepted answers against coverage (the share accepted) as the confidence
    threshold rises, the model's confidence threshold marked (red dot, its figures in the
    title) and the target accuracy as a green line. The accuracy axis spans the curve's range.

    `curve`: [{threshold, coverage, accuracy}] (coverage descending); None: no confidences.
    """
    points = [
        p for p in curve or [] if p.get("accuracy") is not None and not math.isnan(p["accuracy"])
    ]
    chosen = operating_point(points, threshold) if threshold is not None and points else None
    title = "Accuracy of accepted answers vs coverage"
    if threshold is not None and points:
        title += f"\nmodel's threshold {threshold:.3f}: " + (
            f"coverage {chosen['coverage']:.2f}, accuracy {chosen['accuracy']:.3f}"
            if chosen
            else "accepts nothing"
        )
    lowest = min(
        [p["accuracy"] for p in points] + ([target] if target is not None else []), default=0.0
    )
    lo = min(max(0.0, math.floor(lowest * 10 - 1e-9) / 10), 0.9)
    fig = new_figure(size[0] / DPI, size[1] / DPI)
    ax = fig.add_subplot()
    if points:
        ordered = sorted(points, key=lambda p: p["coverage"])
        ax.plot(
            [p["coverage"] for p in ordered],
            [p["accuracy"] for p in ordered],
            color=_mpl(CURVE_COLOR),
            marker="o",
            markersize=2.5,
            linewidth=1.6,
            label="as the confidence threshold rises",
        )
    else:
        _no_data(ax, "no confidences recorded")
    if target is not None:
        ax.axhline(
            target, color=_mpl(TARGET_COLOR), linewidth=1.6, label=f"target accuracy {target:.2f}"
        )
    if chosen is not None:
        ax.plot(
            [chosen["coverage"]],
            [chosen["accuracy"]],
            "o",
            color=_mpl(OPERATING_COLOR),
            markersize=8,
            label=f"model's threshold {threshold:.3f}",
            zorder=3,
        )
    margin = 0.03 * (1.0 - lo)
    ax.set(
        xlim=(-0.02, 1.02),
        ylim=(lo - margin, 1.0 + margin),
        xticks=np.linspace(0.0, 1.0, 6),
        yticks=np.linspace(lo, 1.0, 6),
    )
    ax.yaxis.set_major_formatter("{x:.2f}")
    ax.set_xlabel("coverage (share of answers accepted)", fontsize=FONT_SIZE)
    ax.set_ylabel("accuracy of the accepted answers", fontsize=FONT_SIZE)
    ax.set_title(title, fontsize=FONT_SIZE + 1)
    ax.tick_params(labelsize=FONT_SIZE)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=FONT_SIZE - 1)
    return fig


def coverage_curve_image(
    curve: list[dict] | None,
    threshold: float | None = None,
    target: float | None = None,
    size: tuple[int, int] = (520, 400),
) -> np.ndarray:
    """`coverage_curve_figure` drawn (RGB uint8, `size` = (width, height) pixels)."""
    return _image(coverage_curve_figure(curve, threshold, target, size))


def anomaly_scores_figure(
    good_scores, defect_scores, threshold: float, size: tuple[int, int] = (520, 300), bins: int = 30
) -> Figure:
    """Histograms of the anomaly scores of good (green) and defect (red) images, the threshold
    as a vertical line: how far apart the two are, and what the threshold lets through."""
    good, defect = np.asarray(good_scores, np.float64), np.asarray(defect_scores, np.float64)
    values = np.r_[good, defect, threshold]
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    fig = new_figure(size[0] / DPI, size[1] / DPI)
    ax = fig.add_subplot()
    ax.hist(
        [good, defect],
        bins=edges,
        color=[_mpl(GOOD_COLOR), _mpl(DEFECT_COLOR)],
        label=[f"good ({good.size})", f"defect ({defect.size})"],
    )
    ax.axvline(
        threshold, color="black", linewidth=1.6, label=f"threshold {threshold:.4g} (above: flagged)"
    )
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("anomaly score", fontsize=FONT_SIZE)
    ax.set_ylabel("test images", fontsize=FONT_SIZE)
    ax.set_title("Anomaly scores of the good and the defect test images", fontsize=FONT_SIZE + 1)
    ax.tick_params(labelsize=FONT_SIZE)
    ax.legend(loc="best", fontsize=FONT_SIZE - 1)
    return fig


def anomaly_scores_image(
    good_scores, defect_scores, threshold: float, size: tuple[int, int] = (520, 300), bins: int = 30
) -> np.ndarray:
    """`anomaly_scores_figure` drawn (RGB uint8, `size` = (width, height) pixels)."""
    return _image(anomaly_scores_figure(good_scores, defect_scores, threshold, size, bins))


# ---------------------------------------------------------------- other charts


def grouped_bars_figure(
    groups: list[str],
    series: dict[str, list[float]],
    title: str,
    ylabel: str,
    xlabel: str = "",
    target: float | None = None,
    target_label: str = "target",
) -> Figure:
    """Bars of each series per group, side by side, with an optional target as a line; values
    in [0, 1] (shares). Group names whole, slanted when they would not fit under their bars."""
    n, k = len(groups), max(len(series), 1)
    group_in = 0.25 * k + 0.35
    name_in = text_width_in(groups)
    slanted = name_in > group_in - 0.1
    width = max(
        6.0,
        n * group_in + 1.2 + (0.71 * name_in if slanted else 0.0),
        text_width_in([title], FONT_SIZE + 1) + 0.5,
    )
    height = 3.4 + (0.71 * name_in if slanted else 0.0)
    fig = new_figure(width, height)
    ax = fig.add_subplot()
    x = np.arange(n)
    bar = 0.8 / k
    for j, (label, values) in enumerate(series.items()):
        ax.bar(
            x - 0.4 + (j + 0.5) * bar,
            values,
            width=bar * 0.95,
            label=label,
            color=_mpl(SERIES_COLORS[j % len(SERIES_COLORS)]),
        )
    if target is not None:
        ax.axhline(
            target,
            color=_mpl(TARGET_COLOR),
            linewidth=1.4,
            linestyle="--",
            label=f"{target_label} {target:.2f}",
        )
    ax.set_xticks(x, groups)
    if slanted:
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.set(ylim=(0.0, 1.05), yticks=np.linspace(0.0, 1.0, 5), xlim=(-0.6, n - 0.4))
    ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
    ax.set_title(title, fontsize=FONT_SIZE + 1)
    ax.tick_params(labelsize=FONT_SIZE)
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if target is not None:  # the target after the series
        handles, labels = handles[1:] + handles[:1], labels[1:] + labels[:1]
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(len(handles), 4),
        fontsize=FONT_SIZE - 1,
        frameon=False,
    )
    return fig


def grouped_bars_image(
    groups: list[str],
    series: dict[str, list[float]],
    title: str,
    ylabel: str,
    xlabel: str = "",
    target: float | None = None,
    target_label: str = "target",
) -> np.ndarray:
    """`grouped_bars_figure` drawn (RGB uint8)."""
    return _image(grouped_bars_figure(groups, series, title, ylabel, xlabel, target, target_label))


def save_rgb(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


def augmentation_preview(augmentation, images, masks, count: int) -> np.ndarray:
    """Augmented samples with their (moved) masks drawn in red, as one RGB grid
    (`augmentation`: a `defectflow.data.augment.JointAugmentation`)."""
    count = min(count, len(images))
    aug_images, aug_masks = augmentation(images[:count], masks[:count])
    aug_images = np.asarray(aug_images).astype(np.uint8)
    aug_masks = np.asarray(aug_masks)[..., 0] > 0.5
    tiles = [
        overlay(img, m, (255, 0, 0), 0.6) for img, m in zip(aug_images, aug_masks, strict=True)
    ]
    captions = [[f"augmented #{i}", f"mask px {int(m.sum())}"] for i, m in enumerate(aug_masks)]
    return image_grid(tiles, captions)
