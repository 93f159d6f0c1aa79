"""Expected calibration error and the reliability diagram on cases with a known answer."""
import numpy as np
import pytest

from utils.calibration import ECE_BINS, ece, reliability, reliability_figure


def probs_with_confidence(confidences, predicted, classes=10):
    """(N, classes) rows whose top class is ``predicted`` with probability ``confidence``."""
    rows = []
    for c, p in zip(confidences, predicted, strict=True):
        row = np.full(classes, (1 - c) / (classes - 1))
        row[p] = c
        rows.append(row)
    return np.array(rows)


def test_calibrated_predictions_have_zero_ece():
    # confidence 0.8 everywhere and 8 of 10 right
    probs = probs_with_confidence([0.8] * 10, [0] * 10)
    labels = np.array([0] * 8 + [1] * 2)
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_overconfident_predictions():
    # two bins, half the predictions each: 0.95 and all right (gap 0.05), 0.55 and all wrong (gap 0.55)
    probs = probs_with_confidence([0.95] * 50 + [0.55] * 50, [3] * 100)
    labels = np.array([3] * 50 + [4] * 50)
    assert ece(probs, labels) == pytest.approx(0.5 * 0.05 + 0.5 * 0.55)
    rows = reliability(probs, labels)
    filled = [r for r in rows if r["count"]]
    assert len(rows) == ECE_BINS and [r["count"] for r in filled] == [50, 50]
    assert [r["accuracy"] for r in filled] == [0.0, 1.0]
    assert filled[0]["confidence"] == pytest.approx(0.55) and filled[1]["confidence"] == pytest.approx(0.95)
    assert all(r["accuracy"] is None for r in rows if not r["count"])


def test_bin_edges_are_closed_on_the_right():
    """0.1 belongs to (0, 0.1], 1.0 to the last bin; with 10 bins."""
    probs = probs_with_confidence([0.1, 1.0, 0.30000001], [0, 0, 0])
    rows = reliability(probs, np.array([0, 0, 0]), bins=10)
    assert [r["count"] for r in rows] == [1, 0, 0, 1, 0, 0, 0, 0, 0, 1]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="probs"):
        ece(np.ones(5), np.zeros(5))
    with pytest.raises(ValueError, match="labels"):
        ece(np.ones((5, 2)) / 2, np.zeros(4))


def test_reliability_figure_names_the_ece():
    probs = probs_with_confidence([0.95] * 50 + [0.55] * 50, [3] * 100)
    fig = reliability_figure(probs, np.array([3] * 50 + [4] * 50))
    assert "ECE 30.00% (15 bins)" in fig.axes[0].get_title()
    assert len(fig.axes[0].patches) == 2 * 2  # accuracy and gap bars of the two filled bins only
    heights = sorted(round(p.get_height(), 6) for p in fig.axes[0].patches)
    assert heights == [-0.05, 0.0, 0.55, 1.0]  # gap above the wrong bin, below the right one
