"""Output folders appear whole or not at all, with the permissions of any other folder the user makes."""

from __future__ import annotations

import os

import pytest

from edge_recover.atomic import atomic_dir, atomic_file, write_json_atomic
from edge_recover.errors import EdgeRecoverError


def test_folder_appears_complete_with_usual_permissions(tmp_path):
    with atomic_dir(tmp_path / "pkg") as tmp:
        assert not (tmp_path / "pkg").exists()
        (tmp / "a.txt").write_text("x")
    made = tmp_path / "made"
    made.mkdir()  # what the user's umask gives a new folder
    assert (tmp_path / "pkg" / "a.txt").read_text() == "x"
    assert (tmp_path / "pkg").stat().st_mode & 0o777 == made.stat().st_mode & 0o777
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_error_leaves_nothing_and_existing_output_is_kept(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "pkg") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    with pytest.raises(EdgeRecoverError, match="already exists"):
        with atomic_dir(tmp_path / "old"):
            pass
    with atomic_dir(tmp_path / "old", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["new.txt"]
    assert os.listdir(tmp_path) == ["old"]


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.onnx_adapter"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.onnx_adapter"]
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
    write_json_atomic(tmp_path / "m.json", "{}")
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["a.onnx_adapter", "m.json"]
