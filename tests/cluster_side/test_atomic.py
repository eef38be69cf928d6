"""Atomic files and folders survive a crash right after they were put in place.

A rename is only durable once the folder holding the new name is flushed too: ``os.fsync`` is
recorded here (the real call still runs, and so does the real rename), since a power cut cannot
be staged in a test.
"""

from __future__ import annotations

import os

import pytest

from rs_cluster import atomic


@pytest.fixture
def fsynced(monkeypatch) -> list[tuple[str, bool]]:
    """(path, exists-at-its-name) of every fsync, in order, as /proc names the descriptor."""
    calls: list[tuple[str, bool]] = []
    real = os.fsync

    def recording(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append((path, os.path.isdir(path)))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


def test_an_atomic_write_flushes_the_folder_after_the_rename(tmp_path, fsynced):
    target = tmp_path / "status.json"
    atomic.write_json_atomic(target, {"state": "running"})
    folder_syncs = [i for i, (path, is_dir) in enumerate(fsynced) if is_dir]
    assert [fsynced[i][0] for i in folder_syncs] == [str(tmp_path)]
    assert folder_syncs[-1] == len(fsynced) - 1  # after the file itself, i.e. after the rename
    assert target.read_text() == '{\n  "state": "running"\n}\n'


def test_a_folder_renamed_into_place_is_flushed_in_its_parent(tmp_path, fsynced):
    staged = tmp_path / ".model.partial"
    staged.mkdir()
    (staged / "model.json").write_text("{}")
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("the old model")

    atomic.replace_dir(staged, final)

    assert [p for p, is_dir in fsynced if is_dir] == [str(tmp_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in final.iterdir()) == ["model.json"]


def test_train_flushes_the_model_folder_it_renames_into_place(tmp_path, fsynced):
    from rs_cluster import train

    staged = tmp_path / ".model.training" / "model"
    staged.mkdir(parents=True)
    (staged / "model.json").write_text("{}")
    train._commit(staged, tmp_path / "model", overwrite=False)
    assert str(tmp_path) in [p for p, is_dir in fsynced if is_dir]
    assert (tmp_path / "model" / "model.json").exists()
