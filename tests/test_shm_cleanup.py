"""DeepSpeed's CPU all-reduce leaves one 64 MiB shared-memory file per rank; the launcher removes
the finished job's, and only those (this user's, this master port's)."""

from __future__ import annotations

import os

from ltune.launcher.process import remove_shm_buffers


def test_removes_only_this_jobs_buffers(tmp_path):
    uid = os.getuid()
    ours = [tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29512_{rank}" for rank in (0, 1)]
    kept = [
        tmp_path / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29513_0",  # another job's port
        tmp_path / f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_29512_0",  # another user's
        tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_295120_0" if uid != 0 else tmp_path / "x_29512_0",
        tmp_path / "other_file_29512_0",
    ]
    for path in ours + kept:
        path.write_bytes(b"x")
    removed = remove_shm_buffers(29512, shm_dir=tmp_path)
    assert sorted(removed) == sorted(ours)
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in kept)


def test_missing_folder_is_nothing_to_do(tmp_path):
    assert remove_shm_buffers(29512, shm_dir=tmp_path / "absent") == []
