"""The charts people look at: what each figure says (its texts, lines, bars and values, read
from the matplotlib Figure, not from pixels), that no text is cut or runs off the figure, and
that drawing many figures leaves none behind."""

import gc
import math
import os
from unittest import mock

import cv2
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from defectflow.evaluation import plots
from defectflow.evaluation.metrics import expected_calibration_error, reliability_bins

LONG = "faulty_imprint_with_a_very_long_name"
CLASSES = ["good", "crack", LONG, "poke"]
MATRIX = [[9, 1, 0, 0], [0, 7, 2, 1], [1, 0, 1003, 3], [0, 0, 4, 5]]
HISTORY = {
    "loss": [1.0, 0.7, 0.5, 0.4],
    "val_loss": [1.1, 0.8, 0.7, 0.65],
    "class_loss": [0.9, 0.6, 0.4, 0.3],
    "val_class_loss": [],  # recorded but empty: no line
}


def _drawn(fig: Figure) -> Figure:
    plots.figure_to_rgb(fig)  # lays out and draws: tick labels and extents are final
    return fig


def _texts(fig: Figure) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _strings(fig: Figure) -> list[str]:
    return [t.get_text() for t in _texts(fig)]


def assert_nothing_cut(fig: Figure) -> None:
    """Every text drawn (a tick label outside the view is not) lies wholly inside the figure."""
    drawn = []
    draw = Text.draw

    def recording(text, renderer):
        if text.get_visible() and text.get_text().strip():
            drawn.append(text)
        return draw(text, renderer)

    with mock.patch.object(Text, "draw", recording):
        plots.figure_to_rgb(fig)
    assert drawn
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    for text in drawn:
        box = text.get_window_extent(renderer)
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1, (
            f"{text.get_text()!r} runs off the figure: {box} in {width} x {height}"
        )


def assert_apart(texts: list[Text], renderer) -> None:
    """No two of `texts` (all at the same angle) overlap: their rotated boxes, not the upright
    boxes around them, are apart along the text's direction or across it."""
    angle = math.radians(texts[0].get_rotation())
    along, across = (
        np.array([math.cos(angle), math.sin(angle)]),
        np.array([-math.sin(angle), math.cos(angle)]),
    )
    boxes = []
    for text in texts:
        assert text.get_rotation() == texts[0].get_rotation()
        center = (
            text.get_window_extent(renderer).get_points().mean(axis=0)
        )  # also the rotated box's
        rotation = text.get_rotation()
        text.set_rotation(0)
        upright = text.get_window_extent(renderer)
        text.set_rotation(rotation)
        boxes.append(
            (text.get_text(), center @ along, center @ across, upright.width, upright.height)
        )
    for i, (name_a, a_along, a_across, a_w, a_h) in enumerate(boxes):
        for name_b, b_along, b_across, b_w, b_h in boxes[i + 1 :]:
            apart_along = abs(a_along - b_along) >= (a_w + b_w) / 2
            apart_across = abs(a_across - b_across) >= (a_h + b_h) / 2
            assert apart_along or apart_across, f"{name_a!r} overlaps {name_b!r}"


# ---------------------------------------------------------------- confusion matrix


def test_confusion_matrix_shows_every_class_name_whole_and_the_counts_given():
    fig = _drawn(plots.confusion_matrix_figure(MATRIX, CLASSES))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    cells = {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
    }
    assert {key: int(value) for key, value in cells.items()} == {
        (i, j): MATRIX[i][j] for i in range(4) for j in range(4)
    }
    assert "Confusion matrix" in fig.get_suptitle()
    # The shade is the share of the row: 1003 of 1007 is dark, 9 of 10 too, 1 of 10 light.
    shade = ax.images[0].get_array()
    assert shade[2, 2] == pytest.approx(1003 / 1007) and shade[1, 2] == pytest.approx(2 / 10)
    assert_nothing_cut(fig)
    assert_apart(ax.get_xticklabels(), fig.canvas.get_renderer())


def test_confusion_matrix_grows_with_the_names_and_rejects_a_wrong_shape():
    short = plots.confusion_matrix_image([[1, 0], [0, 1]], ["a", "b"])
    long = plots.confusion_matrix_image([[1, 0], [0, 1]], ["a", LONG])
    assert short.dtype == np.uint8 and short.ndim == 3 and short.shape[2] == 3
    assert long.shape[0] > short.shape[0] and long.shape[1] > short.shape[1]
    many = [f"class_{i}_{'x' * i}" for i in range(12)]
    fig = plots.confusion_matrix_figure(np.eye(12, dtype=int).tolist(), many)
    assert_nothing_cut(fig)
    assert_apart(fig.axes[0].get_xticklabels(), fig.canvas.get_renderer())
    with pytest.raises(ValueError):
        plots.confusion_matrix_figure([[1, 0], [0, 1]], ["a", "b", "c"])


# ---------------------------------------------------------------- training curves


def test_curves_have_one_line_per_recorded_key_with_its_values():
    keys = ["loss", "val_loss", "class_loss", "val_class_loss", "absent"]
    fig = _drawn(plots.curves_figure(HISTORY, keys, title="loss"))
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["loss", "val_loss", "class_loss"]
    for line in lines:
        assert list(line.get_xdata()) == [1, 2, 3, 4]  # epochs count from 1
        assert list(line.get_ydata()) == HISTORY[line.get_label()]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["loss", "val_loss", "class_loss"]
    assert ax.get_xlabel() == "epoch" and "loss" in ax.get_title()
    assert all(float(t).is_integer() for t in ax.get_xticks())  # whole epochs
    assert_nothing_cut(fig)


def test_curves_image_has_the_size_asked_and_says_when_there_is_no_history():
    img = plots.curves_image(HISTORY, ["loss", "val_loss"], size=(560, 320), title="loss")
    assert img.shape == (320, 560, 3) and img.dtype == np.uint8
    empty = plots.curves_figure({}, ["loss"])
    assert not empty.axes[0].get_lines()
    assert "no training history recorded" in _strings(empty)


# ---------------------------------------------------------------- reliability


def test_reliability_diagram_bars_counts_curve_ticks_and_ece():
    bins = reliability_bins([0.95, 0.85, 0.55, 0.52, 0.58], [1, 0, 1, 0, 1])
    ece = expected_calibration_error(bins)
    fig = _drawn(plots.reliability_diagram_figure(bins, ece, size=400))
    ax, counts_ax = fig.axes
    filled = [b for b in bins if b["count"]]
    bars = ax.patches
    assert [round(p.get_x(), 6) for p in bars] == [b["lower"] for b in filled]
    assert [p.get_height() for p in bars] == pytest.approx([b["accuracy"] for b in filled])
    assert [p.get_height() for p in counts_ax.patches] == [b["count"] for b in filled]
    assert [t.get_text() for t in counts_ax.texts] == ["3", "1", "1"]
    curve = next(line for line in ax.get_lines() if line.get_label() == "mean confidence, accuracy")
    assert list(curve.get_xdata()) == pytest.approx([b["confidence"] for b in filled])
    assert list(curve.get_ydata()) == pytest.approx([b["accuracy"] for b in filled])
    assert "Perfectly calibrated" in [line.get_label() for line in ax.get_lines()]
    assert f"ECE = {ece:.3f}" in ax.get_title()
    assert list(ax.get_yticks()) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert [t.get_text() for t in counts_ax.get_xticklabels()] == [
        "0.0",
        "0.2",
        "0.4",
        "0.6",
        "0.8",
        "1.0",
    ]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "0.0",
        "0.2",
        "0.4",
        "0.6",
        "0.8",
        "1.0",
    ]
    assert counts_ax.get_xlabel().startswith("confidence") and ax.get_ylabel() == "accuracy"
    assert_nothing_cut(fig)
    img = plots.reliability_diagram_image(bins, ece, size=400)
    assert img.shape == (400, 400, 3) and img.dtype == np.uint8


def test_reliability_diagram_without_confidences():
    fig = plots.reliability_diagram_figure(None, float("nan"), size=400)
    assert not fig.axes[0].patches and "no confidences recorded" in _strings(fig)
    assert "ECE = n/a" in fig.axes[0].get_title()
    assert_nothing_cut(fig)


# ---------------------------------------------------------------- coverage


CURVE = [
    {"threshold": 0.0, "coverage": 1.0, "accuracy": 0.8},
    {"threshold": 0.7, "coverage": 0.6, "accuracy": 0.9},
    {"threshold": 0.9, "coverage": 0.2, "accuracy": 1.0},
]


def test_operating_point_is_the_point_the_threshold_selects():
    assert (
        plots.operating_point(CURVE, 0.75) == CURVE[2]
        and plots.operating_point(CURVE, 0.7) == CURVE[1]
    )
    assert plots.operating_point(CURVE, 0.95) is None


def test_coverage_curve_marks_the_models_threshold_and_the_target():
    fig = _drawn(plots.coverage_curve_figure(CURVE, threshold=0.7, target=0.85))
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    curve = lines["as the confidence threshold rises"]
    assert list(curve.get_xdata()) == [0.2, 0.6, 1.0] and list(curve.get_ydata()) == [1.0, 0.9, 0.8]
    marker = lines["model's threshold 0.700"]
    assert (list(marker.get_xdata()), list(marker.get_ydata())) == ([0.6], [0.9])
    assert list(lines["target accuracy 0.85"].get_ydata()) == [0.85, 0.85]
    assert "coverage 0.60, accuracy 0.900" in ax.get_title()
    assert ax.get_xlabel().startswith("coverage") and ax.get_ylabel().startswith("accuracy")
    assert ax.get_ylim()[0] < 0.8  # the accuracy axis spans the curve
    assert_nothing_cut(fig)
    img = plots.coverage_curve_image(CURVE, threshold=0.7, target=0.85)
    assert img.shape == (400, 520, 3) and img.dtype == np.uint8


def test_coverage_curve_without_threshold_or_points():
    plain = plots.coverage_curve_figure(CURVE)
    assert [line.get_label() for line in plain.axes[0].get_lines()] == [
        "as the confidence threshold rises"
    ]
    nothing = plots.coverage_curve_figure(CURVE, threshold=0.95)
    assert "accepts nothing" in nothing.axes[0].get_title()
    empty = plots.coverage_curve_figure(None)
    assert not empty.axes[0].get_lines() and "no confidences recorded" in _strings(empty)
    assert_nothing_cut(empty)


# ---------------------------------------------------------------- anomaly scores


def test_anomaly_scores_histograms_and_threshold():
    good, defect = [0.1, 0.12, 0.2], [0.4, 0.5, 0.55, 0.6]
    fig = _drawn(plots.anomaly_scores_figure(good, defect, 0.3))
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["good (3)", "defect (4)"] and legend[2].startswith("threshold 0.3")
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == len(good) + len(defect)
    threshold = next(line for line in ax.get_lines() if line.get_label().startswith("threshold"))
    assert list(threshold.get_xdata()) == [0.3, 0.3]
    assert ax.get_xlabel() == "anomaly score" and ax.get_ylabel() == "test images"
    assert_nothing_cut(fig)
    assert plots.anomaly_scores_image(good, [], 0.3).shape == (300, 520, 3)


# ---------------------------------------------------------------- image grids


def test_image_grid_captions_are_whole_and_apart():
    tiles = [np.full((32, 48, 3), 40 * i, np.uint8) for i in range(5)]
    captions = [
        [f"true {LONG}", f"pred {LONG}", "dice 0.50"],
        ["true good", "pred good", "dice 1.00"],
    ] * 2
    captions.append(["true crack", "pred crack", "dice 0.75"])
    fig = _drawn(plots.image_grid_figure(tiles, captions, columns=4, tile_size=64))
    shown = [ax for ax in fig.axes if ax.images]
    assert [ax.get_xlabel() for ax in shown] == ["\n".join(c) for c in captions]
    assert [ax.images[0].get_array().shape for ax in shown] == [(64, 64, 3)] * 5
    assert_nothing_cut(fig)
    renderer = fig.canvas.get_renderer()
    assert_apart([ax.xaxis.label for ax in shown], renderer)
    img = plots.image_grid(tiles, captions, columns=4, tile_size=64)
    assert img.dtype == np.uint8 and img.shape[1] >= 4 * 64
    with pytest.raises(ValueError):
        plots.image_grid([], [])
    with pytest.raises(ValueError):
        plots.image_grid(tiles, captions[:2])


def _case(tmp_path, name, true, predicted_class, box=None):
    """A gray image (and a mask with `box` = (y0, y1, x0, x1) as defect) under tmp_path/true."""
    folder = tmp_path / true
    folder.mkdir(exist_ok=True)
    image = np.full((48, 64, 3), 90, np.uint8)
    cv2.circle(image, (32, 24), 16, (160, 160, 160), -1)
    path = folder / f"{name}.png"
    cv2.imwrite(str(path), image)
    mask_path = None
    if box is not None:
        mask = np.zeros((48, 64), np.uint8)
        mask[box[0] : box[1], box[2] : box[3]] = 255
        mask_path = folder / f"{name}_mask.png"
        cv2.imwrite(str(mask_path), mask)
    predicted = np.zeros((48, 64), np.uint8)
    predicted[30:40, 40:60] = 1
    row = {
        "path": str(path),
        "mask_path": str(mask_path) if mask_path else None,
        "true": true,
        "predicted": predicted_class,
        "confidence": 0.7,
        "dice": 0.0,
    }
    return row, predicted


def test_error_analysis_shows_image_true_and_predicted_mask_with_whole_captions(tmp_path):
    cases = [
        _case(tmp_path, "000", LONG, "poke", box=(10, 20, 10, 30)),
        _case(tmp_path, "001", "good", "good"),
    ]
    fig = _drawn(plots.error_analysis_figure(cases, tile_size=100, columns=2))
    first, second = fig.subfigs
    assert first.get_suptitle() == f"true {LONG} -> predicted poke (0.70)"
    assert first.get_supxlabel() == f"Dice 0.00   {LONG}/000.png"
    assert second.get_suptitle() == "true good -> predicted good (0.70)"
    colors = [
        next(t for t in _texts(sf) if t.get_text() == sf.get_suptitle()).get_color()
        for sf in fig.subfigs
    ]
    assert colors[0] != colors[1]  # a mistake stands out
    image_ax, truth_ax, predicted_ax = first.axes
    assert [ax.get_title() for ax in first.axes] == ["image", "true mask", "predicted mask"]
    image, truth, predicted = (ax.images[0].get_array().astype(int) for ax in first.axes)
    assert image.shape == (100, 100, 3)
    assert (truth[..., 1] - truth[..., 0] > 60).sum() > 50  # the true mask in green
    assert (predicted[..., 0] - predicted[..., 1] > 60).sum() > 50  # the prediction in red
    assert np.ptp(image, axis=2).max() < 10  # the plain image: no overlay colour
    assert_nothing_cut(fig)
    assert plots.error_analysis_grid(cases, tile_size=100, columns=1).dtype == np.uint8
    with pytest.raises(ValueError):
        plots.error_analysis_grid([])


# ---------------------------------------------------------------- grouped bars


def test_grouped_bars_name_groups_whole_and_draw_the_target():
    series = {"flagged": [0.9, 0.5], "flagged by classifier": [0.4, 0.25]}
    fig = _drawn(
        plots.grouped_bars_figure(
            ["crack", LONG],
            series,
            "Leave one out",
            "share flagged",
            target=0.9,
            target_label="target",
        )
    )
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["crack", LONG]
    assert [p.get_height() for p in ax.patches] == [0.9, 0.5, 0.4, 0.25]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["flagged", "flagged by classifier", "target 0.90"]
    assert_nothing_cut(fig)
    assert_apart(ax.get_xticklabels(), fig.canvas.get_renderer())


# ---------------------------------------------------------------- state


def test_drawing_many_figures_leaves_none_behind():
    import matplotlib.pyplot as plt

    def alive() -> int:
        gc.collect()
        return sum(isinstance(o, Figure) for o in gc.get_objects())

    before = alive()
    for _ in range(15):
        plots.confusion_matrix_image(MATRIX, CLASSES)
        plots.reliability_diagram_image(reliability_bins([0.9, 0.6], [1, 0]), 0.1)
        plots.curves_image(HISTORY, ["loss"])
    assert alive() <= before + 1
    assert plt.get_fignums() == []  # nothing went through pyplot


def test_matplotlib_keeps_its_state_under_the_project_home(tmp_path, monkeypatch):
    from defectflow.environment import configure_environment

    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    for key in ("DEFECTFLOW_HOME", "PREFECT_HOME", "BENTOML_HOME", "KERAS_HOME"):
        monkeypatch.delenv(key, raising=False)
    configure_environment(tmp_path / "home")
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "home" / "matplotlib")
    assert (tmp_path / "home" / "matplotlib").is_dir()
