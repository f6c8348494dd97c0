"""Metrics on hand-made predictions, with hand-computed expected values."""

import math

import pytest

from unveil.data.boxes import IntGridFormat
from unveil.eval.evaluate import format_table, mcq_letter
from unveil.eval.metrics import GroundingMetrics, GroupedMetrics
from unveil.eval.parse import closed_correct, parse_answer

F = IntGridFormat(100)
V = ["nodule", "mass", "cyst"]


def p(text):
    return parse_answer(text, F, V)


def test_parse_answer():
    pr = p("Abnormality detected. Region [10, 10, 30, 30]: nodule. Region [50, 50, 90, 90]: mass.")
    assert pr.abnormal and pr.labels == ["nodule", "mass"] and len(pr.boxes) == 2
    assert not p("No abnormality detected. The study appears normal.").abnormal
    assert p("There is a mass.").abnormal and p("").boxes == []


def test_labels_named_before_their_boxes():
    """Answers that name the finding first ("a nodule at [box]") label each box with its own
    finding; before, both boxes took the finding named after the first box ('cyst', 'cyst')."""
    assert p("A nodule at [10, 10, 20, 20] and a cyst at [50, 50, 60, 60].").labels == ["nodule", "cyst"]
    assert p("Findings: mass [5, 5, 9, 9], nodule [20, 20, 30, 30].").labels == ["mass", "nodule"]
    # the MAU phrasing, with a finding also named in the lead sentence, stays label-after-box
    assert p("There is a nodule. Region [10, 10, 30, 30]: nodule. Region [50, 50, 90, 90]: mass.").labels == [
        "nodule",
        "mass",
    ]


def test_grounding_metrics_hand_computed():
    m = GroundingMetrics()
    gt = [[0.1, 0.1, 0.3, 0.3]]
    # perfect box + right finding
    m.update_study(p("Abnormality detected. Region [10, 10, 30, 30]: nodule."), gt, ["nodule"])
    # half-overlapping box (IoU = 1/3), wrong finding
    m.update_study(p("Abnormality detected. Region [20, 10, 40, 30]: cyst."), gt, ["nodule"])
    # says normal on an abnormal study: IoU 0, presence wrong
    m.update_study(p("No abnormality detected."), gt, ["nodule"])
    # normal studies: one correct, one with an invented box
    m.update_study(p("No abnormality detected."), [], [])
    m.update_study(p("Abnormality detected. Region [1, 1, 5, 5]: mass."), [], [])
    # two GT boxes, one found
    m.update_study(
        p("Abnormality detected. Region [60, 60, 80, 80]: mass."),
        [[0.6, 0.6, 0.8, 0.8], [0.1, 0.1, 0.2, 0.2]],
        ["mass", "cyst"],
    )
    # one GT box, answered with the right box and an invented second one: plain IoU 1, strict 1/2
    extra = m.update_study(
        p("Abnormality detected. Region [10, 10, 30, 30]: nodule. Region [60, 60, 70, 70]: mass."), gt, ["nodule"]
    )
    assert extra["iou"] == pytest.approx(1.0) and extra["iou_strict"] == pytest.approx(0.5)
    r = m.compute()
    assert r["iou"] == pytest.approx((1 + 1 / 3 + 0 + 0.5 + 1) / 5)
    assert r["iou_strict"] == pytest.approx((1 + 1 / 3 + 0 + 0.5 + 0.5) / 5)
    assert r["acc50"] == pytest.approx(3 / 6)
    assert r["finding_acc"] == pytest.approx(3 / 6)
    assert r["presence_acc"] == pytest.approx(5 / 7)
    assert r["fpr_normal"] == pytest.approx(0.5) and r["invented_box_rate"] == pytest.approx(0.5)
    assert math.isnan(r["closed_acc"])


def test_compute_sees_updates_made_after_an_earlier_compute(recwarn):
    """torchmetrics caches compute(); every typed update must drop that cache (a notebook that
    computes, adds studies and computes again used to get the first figures back) and count as
    an update (no 'compute called before update' warning)."""
    m = GroundingMetrics()
    gt = [[0.1, 0.1, 0.3, 0.3]]
    m.update_closed(True)
    m.update_study(p("Abnormality detected. Region [10, 10, 30, 30]: nodule."), gt, ["nodule"])
    assert m.compute()["closed_acc"] == 1.0 and m.compute()["iou"] == pytest.approx(1.0)
    m.update_closed(False)
    m.update_mcq(True)
    m.update_study(p("No abnormality detected."), gt, ["nodule"])
    r = m.compute()
    assert r["closed_acc"] == pytest.approx(0.5) and r["iou"] == pytest.approx(0.5) and r["mcq_acc"] == 1.0
    assert not [w for w in recwarn if "before the ``update``" in str(w.message)]
    with pytest.raises(ValueError, match="kind must be"):
        m.update("boxes", [])


def test_closed_and_mcq():
    assert (
        closed_correct("Yes.", "yes") and closed_correct("nodule, small", "nodule") and not closed_correct("no", "yes")
    )
    assert mcq_letter("B: grown") == "B" and mcq_letter("The answer is C.") == "C"
    assert mcq_letter("A or B") is None and mcq_letter("A: x B: y") is None and mcq_letter("") is None


def test_grouped_metrics_and_table():
    g = GroupedMetrics()
    for mod, ok in (("ct", True), ("ct", False), ("xray", True)):
        for t in (g.overall, g.of("modality", mod)):
            t.update_closed(ok)
    r = g.compute("test")
    assert r["test/closed_acc"] == pytest.approx(2 / 3)
    assert r["test/modality/ct/closed_acc"] == pytest.approx(0.5) and r["test/modality/xray/closed_acc"] == 1.0
    table = format_table(r)
    assert "modality/ct" in table and "closed_acc" in table
