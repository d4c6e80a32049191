"""Pictures people look at: sample grids, confusion matrix, training curves (OpenCV only)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX


def _caption(tile: np.ndarray, lines: list[str], color=(255, 255, 255)) -> np.ndarray:
    bar = np.zeros((16 * len(lines) + 6, tile.shape[1], 3), np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(bar, line, (4, 14 + 16 * i), FONT, 0.42, color, 1, cv2.LINE_AA)
    return np.vstack([tile, bar])


def image_grid(tiles: list[np.ndarray], captions: list[list[str]], columns: int = 4, tile_size: int = 160) -> np.ndarray:
    """RGB tiles with captions under each, in a grid (RGB uint8)."""
    if not tiles:
        raise ValueError("image_grid needs at least one tile")
    cells = [
        _caption(cv2.resize(t.astype(np.uint8), (tile_size, tile_size)), c) for t, c in zip(tiles, captions, strict=True)
    ]
    height = max(c.shape[0] for c in cells)
    cells = [np.vstack([c, np.zeros((height - c.shape[0], tile_size, 3), np.uint8)]) for c in cells]
    while len(cells) % columns:
        cells.append(np.zeros_like(cells[0]))
    rows = [np.hstack(cells[i : i + columns]) for i in range(0, len(cells), columns)]
    return np.vstack(rows)


def confusion_matrix_image(matrix: list[list[int]], classes: list[str], cell: int = 60) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    n = len(classes)
    margin = 130
    img = np.full((margin + n * cell + 10, margin + n * cell + 10, 3), 255, np.uint8)
    row_max = np.maximum(m.sum(axis=1, keepdims=True), 1)
    for i in range(n):
        cv2.putText(img, classes[i][:14], (4, margin + i * cell + cell // 2 + 4), FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        for j in range(n):
            shade = int(255 - 200 * m[i, j] / row_max[i, 0])
            x, y = margin + j * cell, margin + i * cell
            cv2.rectangle(img, (x, y), (x + cell, y + cell), (shade, shade, 255), -1)
            cv2.rectangle(img, (x, y), (x + cell, y + cell), (180, 180, 180), 1)
            cv2.putText(img, str(int(m[i, j])), (x + cell // 2 - 8, y + cell // 2 + 5), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for j in range(n):
        org = (margin + j * cell + 4, margin - 8)
        cv2.putText(img, classes[j][:9], org, FONT, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "rows: true, columns: predicted", (4, 20), FONT, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def curves_image(history: dict[str, list[float]], keys: list[str], size=(640, 360)) -> np.ndarray:
    """Line plot of training history series (e.g. loss and val_loss) per epoch."""
    width, height = size
    img = np.full((height, width, 3), 255, np.uint8)
    series = [(k, np.asarray(history[k], dtype=np.float64)) for k in keys if history.get(k)]
    if not series:
        return img
    values = np.concatenate([v for _, v in series])
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1.0
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    for idx, (key, v) in enumerate(series):
        xs = np.linspace(50, width - 20, max(len(v), 2))[: len(v)]
        ys = height - 40 - (v - lo) / (hi - lo) * (height - 80)
        pts = np.stack([xs, ys], axis=1).astype(np.int32)
        color = colors[idx % len(colors)]
        cv2.polylines(img, [pts], False, color, 2, cv2.LINE_AA)
        cv2.putText(img, key, (60, 20 + 16 * idx), FONT, 0.45, color, 1, cv2.LINE_AA)
    cv2.putText(img, f"{hi:.3g}", (2, 44), FONT, 0.4, (0, 0, 0), 1)
    cv2.putText(img, f"{lo:.3g}", (2, height - 36), FONT, 0.4, (0, 0, 0), 1)
    cv2.putText(img, "epoch", (width // 2, height - 10), FONT, 0.45, (0, 0, 0), 1)
    return img


def save_rgb(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
