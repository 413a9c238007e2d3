"""The CLI's contract for bad input, checked the same way by every bad-input test: exit status 2,
no traceback, one line ``uniultra: error: ...`` that contains the expected words."""

from __future__ import annotations


def assert_one_clean_line(code: int, err: str, message: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("uniultra: error: "), err
    assert message in lines[0], err
