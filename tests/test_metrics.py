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


# ---------------------------------------------------------------------------------------------
# open answers and reports (issue 16, item 5)
# ---------------------------------------------------------------------------------------------
def test_open_answer_exact_match_and_token_recall():
    from unveil.eval.text_metrics import open_scores

    assert open_scores("The left lung.", "left lung") == (True, 1.0)
    assert open_scores("Left lung and heart", "left lung") == (False, 1.0)
    assert open_scores("right kidney", "Left kidney") == (False, 0.5)
    # a repeated word counts as often as the reference has it (LLaVA-Med's would give 1.0)
    assert open_scores("left left", "left lung") == (False, 0.5)
    assert open_scores("anything", "the") == (False, 0.0)  # a reference with no tokens


def test_report_bleu_and_rouge_l_hand_computed():
    from unveil.eval.text_metrics import ReportScores

    r = ReportScores()
    r.update("Heart size is normal.", "The heart is normal size")
    got = r.compute()
    # tokens [heart size is normal] vs [heart is normal size]: all unigrams match, 1 of 3 bigrams,
    # no trigram (BLEU-3/4 are 0 without smoothing); equal lengths: no brevity penalty.
    # ROUGE-L: LCS "heart is normal" = 3 of 4 tokens on both sides.
    assert got["bleu1"] == pytest.approx(1.0) and got["bleu2"] == pytest.approx((1 / 3) ** 0.5, abs=1e-4)
    assert got["bleu3"] == 0.0 and got["bleu4"] == 0.0 and got["rouge_l"] == pytest.approx(0.75)
    same = ReportScores()
    same.update("No acute cardiopulmonary process.", "no acute cardiopulmonary process")
    assert same.compute() == pytest.approx({"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0, "rouge_l": 1.0})
    assert all(math.isnan(v) for v in ReportScores().compute().values())


def test_evaluate_scores_open_answers_and_reports_per_modality_and_task(monkeypatch):
    """Open answers are no longer exact-matched into closed_acc; reports get BLEU / ROUGE-L; every
    score is reported overall, per modality and per task, and printed."""
    import torch

    from unveil.data.schema import Sample
    from unveil.eval import evaluate as ev

    def sample(i, task, answer, modality, target=None):
        msgs = [{"role": "user", "content": "<image>\nQ?"}, {"role": "assistant", "content": target or answer}]
        return Sample(
            id=str(i), images=["x.png"], messages=msgs, task=task, answer=answer, meta={"modality": modality}
        )

    samples = [
        sample(0, "vqa_closed", "yes", "ct"),
        sample(1, "vqa_open", "left lung", "ct"),
        sample(2, "vqa_open", "liver", "xray"),
        sample(3, "vqa_open", None, "xray", target="The effusion has decreased."),  # Med-MIM conv: no short answer
        sample(4, "report", None, "xray", target="Heart size is normal."),
    ]
    preds = {
        "0": "Yes",
        "1": "the left lung",
        "2": "spleen",
        "3": "The effusion is smaller.",
        "4": "Heart size is normal.",
    }

    class Backbone:
        model, box_format, extra = torch.nn.Linear(1, 1), F, {}

    monkeypatch.setattr(ev, "PromptCollator", lambda bb: lambda chunk: {"samples": chunk})
    monkeypatch.setattr(ev, "generate", lambda bb, batch, **kw: {"texts": [preds[s.id] for s in batch["samples"]]})
    m = ev.evaluate(Backbone(), samples, out_dir=None, progress=False)
    assert m["test/closed_acc"] == 1.0 and m["test/n_closed"] == 1  # before: the open answers were in it (1/4)
    assert m["test/open_em"] == pytest.approx(1 / 3) and m["test/n_open"] == 3
    assert m["test/open_recall"] == pytest.approx((1 + 0 + 1 / 3) / 3)  # [effusion has decreased]: 1 of 3
    assert m["test/modality/ct/open_recall"] == 1.0 and m["test/modality/xray/open_recall"] == pytest.approx(1 / 6)
    assert m["test/task/vqa_open/open_em"] == pytest.approx(1 / 3) and m["test/task/vqa_closed/closed_acc"] == 1.0
    assert m["test/bleu4"] == 1.0 and m["test/rouge_l"] == 1.0 and m["test/task/report/bleu1"] == 1.0
    assert math.isnan(m["test/modality/ct/bleu1"])
    table = format_table(m)
    assert all(c in table for c in ("open_em", "open_recall", "bleu1", "bleu4", "rouge_l", "task/report"))
