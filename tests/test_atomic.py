"""dpvr.atomic: files written atomically get the mode a plain open() would give them (the user's umask)."""
from __future__ import annotations

import os
import stat

import pytest

from dpvr.atomic import atomic_write, atomic_write_text


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write(tmp_path / "b.bin", lambda tmp: open(tmp, "wb").write(b"y"))
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("z")
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~mask
    for name in ("a.txt", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
