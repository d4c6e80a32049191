"""Pictures people look at: sample grids, confusion matrix, training curves, reliability
diagram, accuracy versus coverage, error analysis (OpenCV only; arrays are RGB uint8)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from defectflow.inference.postprocessing import overlay
from defectflow.inference.preprocessing import read_image, read_mask

FONT = cv2.FONT_HERSHEY_SIMPLEX
BLACK, GRAY, LIGHT = (0, 0, 0), (120, 120, 120), (225, 225, 225)
TRUE_COLOR, PREDICTED_COLOR, WRONG_COLOR = (0, 170, 0), (230, 30, 30), (200, 0, 0)
CURVE_COLOR, OPERATING_COLOR, TARGET_COLOR = (31, 119, 180), (230, 30, 30), (44, 160, 44)


def _caption(tile: np.ndarray, lines: list[str], color=(255, 255, 255)) -> np.ndarray:
    bar = np.zeros((16 * len(lines) + 6, tile.shape[1], 3), np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(bar, line, (4, 14 + 16 * i), FONT, 0.42, color, 1, cv2.LINE_AA)
    return np.vstack([tile, bar])


def image_grid(
    tiles: list[np.ndarray], captions: list[list[str]], columns: int = 4, tile_size: int = 160
) -> np.ndarray:
    """RGB tiles with captions under each, in a grid (RGB uint8)."""
    if not tiles:
        raise ValueError("image_grid needs at least one tile")
    cells = [
        _caption(cv2.resize(t.astype(np.uint8), (tile_size, tile_size)), c)
        for t, c in zip(tiles, captions, strict=True)
    ]
    height = max(c.shape[0] for c in cells)
    cells = [np.vstack([c, np.zeros((height - c.shape[0], tile_size, 3), np.uint8)]) for c in cells]
    while len(cells) % columns:
        cells.append(np.zeros_like(cells[0]))
    rows = [np.hstack(cells[i : i + columns]) for i in range(0, len(cells), columns)]
    return np.vstack(rows)


def confusion_matrix_image(
    matrix: list[list[int]], classes: list[str], cell: int = 60
) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    n = len(classes)
    margin = 130
    img = np.full((margin + n * cell + 10, margin + n * cell + 10, 3), 255, np.uint8)
    row_max = np.maximum(m.sum(axis=1, keepdims=True), 1)
    for i in range(n):
        cv2.putText(
            img,
            classes[i][:14],
            (4, margin + i * cell + cell // 2 + 4),
            FONT,
            0.4,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
        for j in range(n):
            shade = int(255 - 200 * m[i, j] / row_max[i, 0])
            x, y = margin + j * cell, margin + i * cell
            cv2.rectangle(img, (x, y), (x + cell, y + cell), (shade, shade, 255), -1)
            cv2.rectangle(img, (x, y), (x + cell, y + cell), (180, 180, 180), 1)
            cv2.putText(
                img,
                str(int(m[i, j])),
                (x + cell // 2 - 8, y + cell // 2 + 5),
                FONT,
                0.5,
                (0, 0, 0),
                1,
                cv2.LINE_AA,
            )
    for j in range(n):
        org = (margin + j * cell + 4, margin - 8)
        cv2.putText(img, classes[j][:9], org, FONT, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(
        img, "rows: true, columns: predicted", (4, 20), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA
    )
    return img


def curves_image(
    history: dict[str, list[float]], keys: list[str], size=(640, 360), title: str = ""
) -> np.ndarray:
    """Line plot of training history series (e.g. loss and val_loss) per epoch; the legend sits
    above the plot, two entries a line, so it never hides a curve."""
    width, height = size
    img = np.full((height, width, 3), 255, np.uint8)
    series = [(k, np.asarray(history[k], dtype=np.float64)) for k in keys if history.get(k)]
    if title:
        cv2.putText(
            img, title, (max(2, width // 2 - 4 * len(title)), 16), FONT, 0.5, BLACK, 1, cv2.LINE_AA
        )
    if not series:
        return img
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    left, right, bottom = 58, width - 20, height - 40
    top = 26 + 16 * ((len(series) + 1) // 2) + 8
    for idx, (key, _) in enumerate(series):
        org = (left + (idx % 2) * (right - left) // 2, 36 + 16 * (idx // 2))
        color = colors[idx % len(colors)]
        cv2.line(img, (org[0], org[1] - 4), (org[0] + 16, org[1] - 4), color, 2)
        cv2.putText(img, key, (org[0] + 20, org[1]), FONT, 0.42, color, 1, cv2.LINE_AA)
    values = np.concatenate([v for _, v in series])
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    hi = hi if hi > lo else lo + 1.0
    for level in np.linspace(lo, hi, 5):
        y = int(bottom - (level - lo) / (hi - lo) * (bottom - top))
        cv2.line(img, (left, y), (right, y), LIGHT, 1)
        cv2.putText(img, f"{level:.3g}", (2, y + 4), FONT, 0.36, BLACK, 1, cv2.LINE_AA)
    epochs = max(len(v) for _, v in series)
    cv2.line(img, (left, bottom), (right, bottom), GRAY, 1)
    for epoch in sorted({0, epochs - 1, *range(0, epochs, max(1, math.ceil(epochs / 10)))}):
        x = int(left + (right - left) * epoch / max(epochs - 1, 1))
        cv2.line(img, (x, bottom), (x, bottom + 4), GRAY, 1)
        cv2.putText(img, str(epoch + 1), (x - 4, bottom + 16), FONT, 0.35, BLACK, 1, cv2.LINE_AA)
    for idx, (_, v) in enumerate(series):
        xs = left + (right - left) * np.arange(len(v)) / max(epochs - 1, 1)
        ys = bottom - (v - lo) / (hi - lo) * (bottom - top)
        pts = np.stack([xs, ys], axis=1).astype(np.int32)
        cv2.polylines(img, [pts], False, colors[idx % len(colors)], 2, cv2.LINE_AA)
    cv2.putText(img, "epoch", (width // 2 - 20, height - 6), FONT, 0.45, BLACK, 1, cv2.LINE_AA)
    return img


def reliability_diagram_image(bins: list[dict] | None, ece: float, size: int = 480) -> np.ndarray:
    """Accuracy per confidence bin (bars) against perfect calibration (the diagonal), with the
    mean confidence of each bin, its image count, and the ECE in the title.

    `bins`: from `defectflow.evaluation.metrics.reliability_bins`; None when there are no confidences.
    """
    left, top, right, bottom = 56, 44, 24, 62
    img = np.full((size, size, 3), 255, np.uint8)
    plot_w, plot_h = size - left - right, size - top - bottom
    ece_text = "n/a" if ece is None or math.isnan(ece) else f"{ece:.3f}"
    cv2.putText(
        img,
        f"Reliability (top label), ECE = {ece_text}",
        (left, 24),
        FONT,
        0.55,
        BLACK,
        1,
        cv2.LINE_AA,
    )

    def point(x: float, y: float) -> tuple[int, int]:
        return int(round(left + x * plot_w)), int(round(top + (1.0 - y) * plot_h))

    for tick in np.linspace(0.0, 1.0, 6):
        x0, y0 = point(tick, 0.0)
        cv2.line(img, point(0.0, tick), point(1.0, tick), LIGHT, 1)
        cv2.putText(
            img,
            f"{tick:.1f}",
            (left - 30, point(0.0, tick)[1] + 4),
            FONT,
            0.38,
            BLACK,
            1,
            cv2.LINE_AA,
        )
        cv2.putText(img, f"{tick:.1f}", (x0 - 10, y0 + 16), FONT, 0.38, BLACK, 1, cv2.LINE_AA)
    if not bins:
        cv2.putText(
            img,
            "no confidences recorded",
            (left + 20, top + plot_h // 2),
            FONT,
            0.5,
            GRAY,
            1,
            cv2.LINE_AA,
        )
    for b in bins or []:
        if not b["count"]:
            continue
        x0, y0 = point(b["lower"], 0.0)
        x1, y1 = point(b["upper"], b["accuracy"])
        cv2.rectangle(img, (x0 + 2, y1), (x1 - 2, y0), (70, 130, 200), -1)
        cv2.rectangle(img, (x0 + 2, y1), (x1 - 2, y0), (30, 60, 120), 1)
        yc = point(0.0, b["confidence"])[1]  # where the bar would end if calibrated
        cv2.line(img, (x0 + 2, yc), (x1 - 2, yc), (255, 127, 14), 2)
        label = str(b["count"])
        cv2.putText(
            img,
            label,
            ((x0 + x1) // 2 - 4 * len(label), min(y1, yc) - 5),
            FONT,
            0.38,
            BLACK,
            1,
            cv2.LINE_AA,
        )
    cv2.line(img, point(0.0, 0.0), point(1.0, 1.0), GRAY, 1, cv2.LINE_AA)
    cv2.rectangle(img, point(0.0, 1.0), point(1.0, 0.0), BLACK, 1)
    cv2.putText(
        img,
        "confidence (probability of the class answered)",
        (left, img.shape[0] - 24),
        FONT,
        0.42,
        BLACK,
        1,
        cv2.LINE_AA,
    )
    cv2.putText(
        img,
        "bars: accuracy, orange: mean confidence, number: images",
        (left, img.shape[0] - 8),
        FONT,
        0.38,
        GRAY,
        1,
        cv2.LINE_AA,
    )
    cv2.putText(img, "accuracy", (4, top - 8), FONT, 0.42, BLACK, 1, cv2.LINE_AA)
    return img


def operating_point(curve: list[dict], threshold: float) -> dict | None:
    """The point of an accuracy-versus-coverage curve (`defectflow.evaluation.calibration.coverage_curve`)
    that `threshold` selects: what it accepts is what the point with the smallest curve
    threshold >= it accepts; None when it accepts nothing."""
    above = [p for p in curve if p["threshold"] >= threshold]
    return min(above, key=lambda p: p["threshold"]) if above else None


def coverage_curve_image(
    curve: list[dict] | None,
    threshold: float | None = None,
    target: float | None = None,
    size: tuple[int, int] = (520, 400),
) -> np.ndarray:
    """Accuracy of the accepted answers against coverage (the share accepted) as the confidence
    threshold rises, the model's confidence threshold marked (red dot, its figures in the
    title) and the target accuracy as a green line. The accuracy axis spans the curve's range.

    `curve`: [{threshold, coverage, accuracy}] (coverage descending); None: no confidences.
    """
    width, height = size
    left, top, right, bottom = 56, 48, 20, 62
    img = np.full((height, width, 3), 255, np.uint8)
    plot_w, plot_h = width - left - right, height - top - bottom
    points = [
        p for p in curve or [] if p.get("accuracy") is not None and not math.isnan(p["accuracy"])
    ]
    chosen = operating_point(points, threshold) if threshold is not None and points else None
    title = "Accuracy vs coverage"
    if threshold is not None:
        title += f", threshold {threshold:.3f}"
        if chosen is not None:
            title += f": coverage {chosen['coverage']:.2f}, accuracy {chosen['accuracy']:.3f}"
        elif points:
            title += ": accepts nothing"
    cv2.putText(img, title, (8, 20), FONT, 0.45, BLACK, 1, cv2.LINE_AA)
    lowest = min(
        [p["accuracy"] for p in points] + ([target] if target is not None else []), default=0.0
    )
    lo = max(0.0, math.floor(lowest * 10 - 1e-9) / 10)
    lo = min(lo, 0.9)

    def at(coverage: float, accuracy: float) -> tuple[int, int]:
        y = (accuracy - lo) / (1.0 - lo)
        return int(round(left + coverage * plot_w)), int(round(top + (1.0 - y) * plot_h))

    for tick in np.linspace(0.0, 1.0, 6):
        cv2.line(img, at(tick, lo), at(tick, 1.0), LIGHT, 1)
        x, y = at(tick, lo)
        cv2.putText(img, f"{tick:.1f}", (x - 10, y + 16), FONT, 0.38, BLACK, 1, cv2.LINE_AA)
    for level in np.linspace(lo, 1.0, 6):
        cv2.line(img, at(0.0, level), at(1.0, level), LIGHT, 1)
        cv2.putText(
            img,
            f"{level:.2f}",
            (left - 40, at(0.0, level)[1] + 4),
            FONT,
            0.38,
            BLACK,
            1,
            cv2.LINE_AA,
        )
    if not points:
        cv2.putText(
            img,
            "no confidences recorded",
            (left + 20, top + plot_h // 2),
            FONT,
            0.5,
            GRAY,
            1,
            cv2.LINE_AA,
        )
    if target is not None:
        cv2.line(img, at(0.0, target), at(1.0, target), TARGET_COLOR, 2)
        x, y = at(0.0, target)
        cv2.putText(
            img, f"target {target:.2f}", (x + 4, y - 4), FONT, 0.38, TARGET_COLOR, 1, cv2.LINE_AA
        )
    if points:
        ordered = sorted(points, key=lambda p: p["coverage"])
        pts = np.array([at(p["coverage"], p["accuracy"]) for p in ordered], np.int32)
        cv2.polylines(img, [pts], False, CURVE_COLOR, 2, cv2.LINE_AA)
        for x, y in pts:
            cv2.circle(img, (int(x), int(y)), 2, CURVE_COLOR, -1)
    if chosen is not None:
        cv2.circle(img, at(chosen["coverage"], chosen["accuracy"]), 6, OPERATING_COLOR, -1)
    cv2.rectangle(img, at(0.0, 1.0), at(1.0, lo), BLACK, 1)
    cv2.putText(
        img,
        "coverage (share of answers accepted)",
        (left, height - 24),
        FONT,
        0.42,
        BLACK,
        1,
        cv2.LINE_AA,
    )
    cv2.putText(
        img,
        "blue: as the confidence threshold rises; red: the model's threshold",
        (left, height - 8),
        FONT,
        0.36,
        GRAY,
        1,
        cv2.LINE_AA,
    )
    cv2.putText(img, "accuracy of accepted", (4, top - 10), FONT, 0.42, BLACK, 1, cv2.LINE_AA)
    return img


def anomaly_scores_image(
    good_scores, defect_scores, threshold: float, size: tuple[int, int] = (520, 300), bins: int = 30
) -> np.ndarray:
    """Histograms of the anomaly scores of good (green) and defect (red) images, the threshold
    as a vertical line: how far apart the two are, and what the threshold lets through."""
    width, height = size
    left, top, right, bottom = 40, 40, 20, 46
    img = np.full((height, width, 3), 255, np.uint8)
    plot_w, plot_h = width - left - right, height - top - bottom
    good, defect = np.asarray(good_scores, np.float64), np.asarray(defect_scores, np.float64)
    values = np.r_[good, defect, threshold]
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(v, edges)[0] for v in (good, defect)]
    tallest = max(1, *(int(c.max()) for c in counts if c.size))
    bar = plot_w / bins
    for (count, color), offset in zip(
        ((counts[0], TRUE_COLOR), (counts[1], WRONG_COLOR)), (0.0, 0.5), strict=True
    ):
        for i, n in enumerate(count):
            if n:
                x0 = int(left + (i + offset) * bar)
                cv2.rectangle(
                    img,
                    (x0, int(top + plot_h * (1 - n / tallest))),
                    (int(x0 + bar / 2), top + plot_h),
                    color,
                    -1,
                )
    x = int(left + (threshold - lo) / (hi - lo) * plot_w)
    cv2.line(img, (x, top - 4), (x, top + plot_h), BLACK, 2)
    cv2.rectangle(img, (left, top), (left + plot_w, top + plot_h), BLACK, 1)
    for value in np.linspace(lo, hi, 5):
        tx = int(left + (value - lo) / (hi - lo) * plot_w)
        cv2.putText(
            img, f"{value:.3g}", (tx - 12, top + plot_h + 16), FONT, 0.38, BLACK, 1, cv2.LINE_AA
        )
    cv2.putText(
        img,
        f"Anomaly scores: good (green, {good.size}) and defect (red, {defect.size}) test images",
        (8, 20),
        FONT,
        0.42,
        BLACK,
        1,
        cv2.LINE_AA,
    )
    cv2.putText(
        img,
        f"black line: threshold {threshold:.4g}; above it a part is flagged defective",
        (left, height - 8),
        FONT,
        0.36,
        GRAY,
        1,
        cv2.LINE_AA,
    )
    return img


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


def _tile(image: np.ndarray, tile_size: int) -> np.ndarray:
    interpolation = cv2.INTER_AREA if max(image.shape[:2]) > tile_size else cv2.INTER_LINEAR
    return cv2.resize(image, (tile_size, tile_size), interpolation=interpolation)


def error_analysis_grid(
    cases: list[tuple[dict, np.ndarray]], tile_size: int = 200, columns: int = 2
) -> np.ndarray:
    """One panel per case, in the order given: image | true mask | predicted mask, each mask
    over the image, captioned with true and predicted class, confidence and Dice.

    `cases`: (per-image evaluation row, predicted mask uint8 {0, 1}). The image is re-read
    from the row's `path` and the true mask from its `mask_path` (none: a good image).
    """
    if not cases:
        raise ValueError("error_analysis_grid needs at least one case")
    gap, caption_h, header_h = 4, 40, 22
    panel_w = 3 * tile_size + 2 * gap
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
        panel = np.full((tile_size + caption_h, panel_w, 3), 255, np.uint8)
        for i, tile in enumerate(tiles):
            panel[:tile_size, i * (tile_size + gap) : i * (tile_size + gap) + tile_size] = tile
        wrong = row["true"] != row["predicted"]
        confidence = f" ({row['confidence']:.2f})" if "confidence" in row else ""
        first = f"true {row['true']} -> predicted {row['predicted']}{confidence}"
        second = f"Dice {row['dice']:.2f}   " + "/".join(Path(row["path"]).parts[-2:])
        cv2.putText(
            panel,
            first,
            (2, tile_size + 16),
            FONT,
            0.45,
            WRONG_COLOR if wrong else BLACK,
            1,
            cv2.LINE_AA,
        )
        cv2.putText(panel, second, (2, tile_size + 34), FONT, 0.42, GRAY, 1, cv2.LINE_AA)
        panels.append(panel)
    columns = max(1, min(columns, len(panels)))
    while len(panels) % columns:
        panels.append(np.full_like(panels[0], 255))
    header = np.full((header_h, panel_w, 3), 255, np.uint8)
    for i, (name, color) in enumerate(
        (("image", BLACK), ("true mask", TRUE_COLOR), ("predicted mask", PREDICTED_COLOR))
    ):
        cv2.putText(header, name, (i * (tile_size + gap) + 2, 16), FONT, 0.5, color, 1, cv2.LINE_AA)
    spacer = np.full((tile_size + caption_h, 3 * gap, 3), 255, np.uint8)
    grid_rows = []
    for start in range(0, len(panels), columns):
        cells = panels[start : start + columns]
        grid_rows.append(np.hstack([x for cell in cells for x in (cell, spacer)][:-1]))
        grid_rows.append(np.full((2 * gap, grid_rows[-1].shape[1], 3), 255, np.uint8))
    head_spacer = np.full((header_h, 3 * gap, 3), 255, np.uint8)
    headers = np.hstack([x for _ in range(columns) for x in (header, head_spacer)][:-1])
    return np.vstack([headers, *grid_rows[:-1]])


def save_rgb(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


def augmentation_preview(augmentation, images, masks, count: int) -> np.ndarray:
    """Augmented samples with their (moved) masks drawn in red, as one RGB grid
    (`augmentation`: a `defectflow.data.augment.JointAugmentation`)."""
    from defectflow.inference.postprocessing import overlay

    count = min(count, len(images))
    aug_images, aug_masks = augmentation(images[:count], masks[:count])
    aug_images = np.asarray(aug_images).astype(np.uint8)
    aug_masks = np.asarray(aug_masks)[..., 0] > 0.5
    tiles = [
        overlay(img, m, (255, 0, 0), 0.6) for img, m in zip(aug_images, aug_masks, strict=True)
    ]
    captions = [[f"augmented #{i}", f"mask px {int(m.sum())}"] for i, m in enumerate(aug_masks)]
    return image_grid(tiles, captions)
