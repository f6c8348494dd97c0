import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unveil.data.boxes import (
    AbsolutePixelFormat,
    IntGridFormat,
    Qwen2VLFormat,
    get_box_format,
    iou_matrix,
    match_boxes,
)

coord = st.floats(0, 1, allow_nan=False)


@st.composite
def boxes(draw):
    x1, x2 = sorted([draw(coord), draw(coord)])
    y1, y2 = sorted([draw(coord), draw(coord)])
    if x2 - x1 < 0.02 or y2 - y1 < 0.02:
        x1, x2, y1, y2 = 0.1, 0.5, 0.2, 0.6
    return [x1, y1, x2, y2]


@pytest.mark.parametrize(
    "fmt,tol,size",
    [
        (IntGridFormat(100), 0.005, None),
        (IntGridFormat(1000), 0.0005, None),
        (Qwen2VLFormat(), 0.0005, None),
        (AbsolutePixelFormat(), 1 / 448 * 0.5, (448, 336)),
    ],
)
@given(b=boxes())
@settings(max_examples=60, deadline=None)
def test_round_trip(fmt, tol, size, b):
    text = f"Abnormality detected. Region {fmt.format_box(b, size)}: nodule."
    (got,) = fmt.parse(text, size)
    sx = 1 if size is None else 1
    assert np.allclose(got, b, atol=tol * sx + 1e-9 if size is None else 0.5 / min(size) + 1e-9)


def test_formats_render_as_documented():
    b = [0.1, 0.2, 0.35, 0.5]
    assert IntGridFormat(100).format_box(b) == "[10, 20, 35, 50]"
    assert Qwen2VLFormat().format_box(b) == "<|box_start|>(100,200),(350,500)<|box_end|>"
    assert AbsolutePixelFormat().format_box(b, (200, 100)) == "[20, 20, 70, 50]"
    assert get_box_format("int1000").format_box(b) == "[100, 200, 350, 500]"
    with pytest.raises(ValueError, match="unknown box format"):
        get_box_format("xywh")


def test_parse_policy_on_bad_boxes():
    f = IntGridFormat(100)
    assert f.parse("[50, 50, 10, 10]") == [(0.1, 0.1, 0.5, 0.5)]  # reversed corners reordered
    assert f.parse("[0, 0, 103, 50]") == [(0.0, 0.0, 1.0, 0.5)]  # slightly out of range clipped
    assert f.parse("[0, 0, 900, 50]") == []  # far out of range dropped
    assert f.parse("[10, 10, 10, 40]") == []  # zero width dropped
    assert f.parse("[99999999999999999, 1, 2, 3]") == []
    assert f.parse("no box here [1, 2, 3]") == []
    assert AbsolutePixelFormat().parse("[1, 2, 3, 4]") == []  # needs the image size


def test_tiny_box_never_collapses():
    f = IntGridFormat(100)
    (got,) = f.parse(f.format_box([0.501, 0.501, 0.503, 0.503]))
    assert got[2] > got[0] and got[3] > got[1]


def test_iou_and_matching():
    a = [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]
    b = [[0.5, 0.5, 1, 1], [0, 0, 0.25, 0.5]]
    m = iou_matrix(a, b)
    assert m[0, 1] == pytest.approx(0.5)
    assert m[1, 0] == pytest.approx(1.0)
    pairs, _ = match_boxes(a, b)
    assert sorted(pairs) == [(0, 1), (1, 0)]
    g = iou_matrix([[0, 0, 0.1, 0.1]], [[0.9, 0.9, 1, 1]], generalized=True)
    assert g[0, 0] < 0  # GIoU is negative for distant boxes
    assert match_boxes([], b)[0] == []
