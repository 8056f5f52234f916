"""Checkpoint files: atomic save under SIGKILL, corrupt files, resume fallback, shape reports, RNG."""

import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from detkit.engine.checkpoint import (
    CheckpointError,
    get_rng_state,
    load_checkpoint,
    load_model_weights,
    load_resume_checkpoint,
    prune_iter_checkpoints,
    resume_candidates,
    save_checkpoint,
    set_rng_state,
)


def _state(value: float, it: int) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "optimizer": {"state": {}, "param_groups": []},
            "iter": it, "rng": [{"python": random.getstate()}]}


def test_kill_during_save_leaves_loadable_last(tmp_path):
    """SIGKILL after the new data is written but before the rename: last.pth is the old file."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from detkit.engine import checkpoint as c
        last = {str(tmp_path / 'last.pth')!r}
        c.save_checkpoint({{"model": {{"w": torch.zeros(64, 64)}}, "optimizer": {{}}, "iter": 1}}, [last])
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        c.save_checkpoint({{"model": {{"w": torch.ones(64, 64)}}, "optimizer": {{}}, "iter": 2}}, [last])
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert "not reached" not in proc.stdout
    ckpt = load_checkpoint(tmp_path / "last.pth")
    assert ckpt["iter"] == 1 and torch.equal(ckpt["model"]["w"], torch.zeros(64, 64))
    assert resume_candidates(tmp_path) == [tmp_path / "last.pth"]  # the temp file is not a candidate


def test_truncated_checkpoint_clear_error_and_fallback(tmp_path):
    save_checkpoint(_state(1.0, 10), [tmp_path / "iter_10.pth"])
    save_checkpoint(_state(2.0, 20), [tmp_path / "iter_20.pth", tmp_path / "last.pth"])
    data = (tmp_path / "last.pth").read_bytes()
    (tmp_path / "last.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pth .*truncated or corrupt"):
        load_checkpoint(tmp_path / "last.pth")
    messages = []
    path, ckpt = load_resume_checkpoint(tmp_path, log=messages.append)
    assert path == tmp_path / "iter_20.pth" and ckpt["iter"] == 20
    assert any("last.pth" in m and "falling back" in m for m in messages)
    # every candidate corrupt -> an error listing them, never a silent fresh start
    for p in tmp_path.glob("*.pth"):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint(.|\n)*iter_10\.pth"):
        load_resume_checkpoint(tmp_path, log=messages.append)


def test_explicit_resume_path_does_not_fall_back(tmp_path):
    save_checkpoint(_state(1.0, 10), [tmp_path / "iter_10.pth"])
    (tmp_path / "last.pth").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="last.pth"):
        load_resume_checkpoint(tmp_path, explicit=tmp_path / "last.pth")
    save_checkpoint({"model": {"w": torch.zeros(1)}}, [tmp_path / "weights.pth"])
    with pytest.raises(CheckpointError, match="lacks optimizer, iter.*load_from"):
        load_resume_checkpoint(tmp_path, explicit=tmp_path / "weights.pth")


class _Custom:
    pass


def test_pickled_objects_refused_by_weights_only(tmp_path):
    torch.save({"model": {}, "obj": _Custom()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pth")


def test_retention_keeps_newest(tmp_path):
    for it in (5, 10, 15, 20):
        save_checkpoint(_state(0.0, it), [tmp_path / f"iter_{it}.pth"])
    deleted = prune_iter_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["iter_10.pth", "iter_5.pth"]
    assert [p.name for p in resume_candidates(tmp_path)] == ["iter_20.pth", "iter_15.pth"]


def _detector(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Module()
    net.body = nn.Conv2d(3, 8, 3)
    net.cls = nn.Conv2d(8, num_classes, 1)
    return net


def test_class_count_mismatch_reports_keys_and_shapes():
    src = _detector(5).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_model_weights(_detector(4), src, source="coco.pth")
    msg = str(err.value)
    assert "cls.weight: coco.pth [5, 8, 1, 1] vs model [4, 8, 1, 1]" in msg
    assert "cls.bias: coco.pth [5] vs model [4]" in msg
    assert "body.weight" not in msg


def test_load_from_reinitialises_mismatching_layers():
    src = {k: v + 1.0 for k, v in _detector(5).state_dict().items()}
    src["module.extra"] = torch.zeros(1)  # keys only in the file are reported, not loaded
    src = {("module." + k if not k.startswith("module.") else k): v for k, v in src.items()}
    model = _detector(4)
    fresh_cls = model.cls.weight.detach().clone()
    logs = []
    report = load_model_weights(model, src, source="coco.pth", allow_mismatch=True, log=logs.append)
    assert report["mismatched"] == ["cls.weight", "cls.bias"] and report["unexpected"] == ["extra"]
    torch.testing.assert_close(model.body.weight, src["module.body.weight"])
    assert torch.equal(model.cls.weight, fresh_cls)
    assert any("re-initialised" in m and "cls" in m and "[5, 8, 1, 1]" in m for m in logs)


def test_rng_state_roundtrip_through_weights_only(tmp_path):
    state = get_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    save_checkpoint({"rng": [state]}, [tmp_path / "r.pth"])
    random.random(), np.random.rand(), torch.rand(3)
    set_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"][0])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_a_full_disk_is_one_clear_error_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """ENOSPC while writing: CheckpointError (the CLIs print one line, exit 2) naming the file;
    the previous last.pth still loads and no temporary file is left behind."""
    import errno

    import detkit.engine.checkpoint as ckpt

    last = tmp_path / "last.pth"
    save_checkpoint(_state(1.0, 10), [last])

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last\.pth: No space left"):
        save_checkpoint(_state(2.0, 20), [last])
    monkeypatch.undo()
    assert load_checkpoint(last)["iter"] == 10
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]
