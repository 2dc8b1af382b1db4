"""Answer-style format checks shared by ASD (what it teaches) and evaluation (what it checks)."""

from __future__ import annotations

import pytest

from sefe_core.styles import STYLE_INSTRUCTIONS, format_ok, parse_box


@pytest.mark.parametrize(
    "style, text, ok",
    [
        ("yes_no", "Yes", True),
        ("yes_no", "no.", True),
        ("yes_no", "yes it is", False),
        ("mcq", "B", True),
        ("mcq", "B. ball", True),
        ("mcq", "The answer is C.", True),
        ("mcq", "ball", False),
        ("mcq", "F", False),
        ("short", "red", True),
        ("short", "top left", True),
        ("short", "A", False),
        ("short", "[0.10, 0.20, 0.30, 0.40]", False),
        ("short", "the ball is red and round here", False),
        ("brief", " ".join(["w"] * 20), True),
        ("brief", "red", False),
        ("detail", " ".join(["w"] * 50), True),
        ("detail", " ".join(["w"] * 20), False),
        ("bbox", "[0.10, 0.20, 0.30, 0.40]", True),
        ("bbox", "[0.1,0.2,0.3]", False),
        ("bbox", "red", False),
    ],
)
def test_format_ok(style: str, text: str, ok: bool) -> None:
    assert format_ok(style, text) is ok


def test_parse_box_and_unknown_style() -> None:
    assert parse_box(" [0.05, 0.10, 0.5, 1] ") == [0.05, 0.10, 0.5, 1.0]
    assert parse_box("[a, b, c, d]") is None
    with pytest.raises(ValueError, match="unknown style"):
        format_ok("poem", "x")
    assert set(STYLE_INSTRUCTIONS) == {"yes_no", "mcq", "short", "brief", "detail", "bbox"}
