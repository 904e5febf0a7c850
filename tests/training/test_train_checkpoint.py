"""Checkpoint files: flushed to disk before the rename, the previous one kept, and used when the newest
cannot be read (no model needed)."""

import logging
import os

import pytest
import torch

from lumina_turbo.training import checkpoint, durable


def state(step):
    return {"step": step, "lora": {"w": torch.full((2, 2), float(step))}}


def test_data_is_flushed_before_the_rename_publishes_it(tmp_path, monkeypatch):
    path = checkpoint.checkpoint_path(tmp_path)
    flushed = []  # (inode flushed, what `path` was at that moment)
    real_fsync = os.fsync

    def recording_fsync(fd):
        stat = os.fstat(fd)
        current = path.stat().st_ino if path.exists() else None
        flushed.append((stat.st_ino, current, stat.st_size))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    checkpoint.save_checkpoint(tmp_path, state(1))
    published = path.stat().st_ino
    # the file that became training_state.pt was flushed, with its data, while it was not yet published
    assert any(ino == published and current != published and size > 0 for ino, current, size in flushed)
    # and the folder entry (the rename) was flushed after it
    folder = tmp_path.stat().st_ino
    assert [ino for ino, _, _ in flushed][-1] == folder


def test_previous_checkpoint_is_kept_and_used_when_the_newest_is_unreadable(tmp_path, caplog):
    checkpoint.save_checkpoint(tmp_path, state(1))
    assert not checkpoint.previous_checkpoint_path(tmp_path).exists()
    checkpoint.save_checkpoint(tmp_path, state(2))
    checkpoint.save_checkpoint(tmp_path, state(3))
    assert checkpoint.load_checkpoint(tmp_path)["step"] == 3
    previous = torch.load(checkpoint.previous_checkpoint_path(tmp_path), weights_only=True)
    assert previous["step"] == 2 and torch.equal(previous["lora"]["w"], torch.full((2, 2), 2.0))
    assert {p.name for p in tmp_path.iterdir()} == {checkpoint.CHECKPOINT_NAME, checkpoint.PREVIOUS_NAME}

    newest = checkpoint.checkpoint_path(tmp_path)
    newest.write_bytes(newest.read_bytes()[:100])  # cut short (a copy or a disk that lost the tail)
    with caplog.at_level(logging.WARNING, logger="lumina_turbo.training"):
        assert checkpoint.load_checkpoint(tmp_path)["step"] == 2
    assert "resuming from the previous one" in caplog.text

    checkpoint.previous_checkpoint_path(tmp_path).write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointMismatch, match="cannot be read"):
        checkpoint.load_checkpoint(tmp_path)


def test_publish_keeps_the_old_file_where_hard_links_fail(tmp_path, monkeypatch):
    target, tmp = tmp_path / "a.bin", tmp_path / "a.tmp"
    target.write_bytes(b"old")
    tmp.write_bytes(b"new")

    def no_links(*args):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    durable.publish(tmp, target, previous=tmp_path / "a.previous.bin")
    assert target.read_bytes() == b"new" and (tmp_path / "a.previous.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.previous.bin"]
