"""Checkpoint commits that survive a crash at any instant, and the policy of when to save and
what to keep (the manager), on a tiny model in one process."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from supercluster.files import commit_directory
from supercluster.train import checkpoint
from supercluster.train.checkpointing import CheckpointManager


def folder_with(path: Path, text: str) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "data.txt").write_text(text)
    return path


def test_commit_publishes_whole_and_keeps_a_committed_folder(tmp_path):
    final = tmp_path / "step"
    assert commit_directory(folder_with(tmp_path / "a.tmp", "first"), final)
    # A second writer of the same folder (a rank that lost the race to build a cache) is dropped.
    assert not commit_directory(folder_with(tmp_path / "b.tmp", "second"), final)
    assert (final / "sub" / "data.txt").read_text() == "first" and not (tmp_path / "b.tmp").exists()
    assert commit_directory(folder_with(tmp_path / "c.tmp", "third"), final, replace=True)
    assert (final / "sub" / "data.txt").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step"]  # nothing left aside


def test_commit_makes_everything_durable_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a))), real_rename(a, b))[1])
    tmp = folder_with(tmp_path / "x.tmp", "payload")
    commit_directory(tmp, tmp_path / "x")
    renamed = events.index(("rename", str(tmp)))
    synced_before = {path for kind, path in events[:renamed] if kind == "fsync"}
    assert {str(tmp / "sub" / "data.txt"), str(tmp / "sub"), str(tmp)} <= synced_before
    assert ("fsync", str(tmp_path)) in events[renamed:]  # the rename itself made durable


def test_a_failed_commit_never_loses_the_committed_folder(tmp_path, monkeypatch):
    """The moment between removing the old folder and renaming the new one in: a crash (here a
    failing rename) there must leave the committed folder in place."""
    final = tmp_path / "step"
    commit_directory(folder_with(tmp_path / "a.tmp", "committed"), final)
    tmp = folder_with(tmp_path / "b.tmp", "new")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == tmp:
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", rename)
    with pytest.raises(OSError):
        commit_directory(tmp, final, replace=True)
    assert (final / "sub" / "data.txt").read_text() == "committed"


def tiny_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def manager(root, every, keep, step_ref):
    model, optimizer = tiny_state()
    cfg = SimpleNamespace(checkpoint_every=every, keep_checkpoints=keep, async_checkpoint=False)
    return CheckpointManager(root, cfg, [model], [optimizer], lambda: {"at": step_ref[0]})


def test_manager_saves_every_n_and_at_the_end_and_keeps_the_newest(tmp_path):
    root, step = tmp_path / "checkpoints", [0]
    ckpt = manager(root, every=3, keep=2, step_ref=step)
    (root / "step_00000002.tmp").mkdir(parents=True)  # a save a crash cut short
    saved = []
    for step[0] in range(1, 8):
        if ckpt.step_done(step[0], last=step[0] == 7):
            saved.append(step[0])
    ckpt.close(7)
    assert saved == [3, 6, 7]
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [6, 7]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000006", "step_00000007"]
    state = json.loads((root / "step_00000007" / checkpoint.TRAIN_STATE).read_text())
    assert state == {"at": 7, "step": 7}
    # A run resumed at its last step ends without writing that step again.
    again = manager(root, every=3, keep=2, step_ref=step)
    assert again.resume()[0]["step"] == 7
    mtime = (root / "step_00000007" / checkpoint.TRAIN_STATE).stat().st_mtime_ns
    again.close(7)
    assert (root / "step_00000007" / checkpoint.TRAIN_STATE).stat().st_mtime_ns == mtime


def test_manager_without_periodic_saves_still_saves_the_end(tmp_path):
    root, step = tmp_path / "checkpoints", [0]
    ckpt = manager(root, every=0, keep=1, step_ref=step)
    for step[0] in range(1, 4):
        ckpt.step_done(step[0])
    ckpt.close(3)
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [3]


def test_a_checkpoint_overwritten_by_a_new_run_survives_a_failed_commit(tmp_path, monkeypatch):
    """run.resume=false over an old run's folder: its step 2 stays loadable until the new
    step 2 is in place, whatever fails between."""
    root, step = tmp_path / "checkpoints", [2]
    manager(root, every=2, keep=2, step_ref=step).step_done(2)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name == "step_00000002.tmp":  # the commit, not DCP's own files
            raise OSError("crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", rename)
    step[0] = 99
    with pytest.raises(OSError):
        manager(root, every=2, keep=2, step_ref=step).step_done(2)
    found = checkpoint.latest(root)
    assert found is not None and found[0] == 2
    assert json.loads((found[1] / checkpoint.TRAIN_STATE).read_text())["at"] == 2
