"""The CLI's contract for bad input, checked the same way by every bad-input test: exit status 2,
no traceback, one line ``uniultra: error: ...`` that contains the expected words."""

from __future__ import annotations


def assert_one_clean_line(code: int, err: str, message: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("uniultra: error: "), err
    assert message in lines[0], err


def run(capsys, *argv) -> tuple[int, str, str]:
    """``uniultra ARGV`` in this process: (exit status, stdout, stderr)."""
    from uniultra.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def grey(h: int = 48, w: int = 64, seed: int = 0):
    """A seeded random 8-bit grey image."""
    import numpy as np

    return (np.random.default_rng(seed).random((h, w)) * 255).astype(np.uint8)
