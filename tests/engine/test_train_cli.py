"""tools/train.py end to end (one process): outputs, corrupt last.pth fallback, config errors."""

import importlib.util
import os
import subprocess
import sys

import pytest
import yaml

from detkit.config import load_config
from detkit.engine import load_checkpoint

from engine_helpers import REPO, SMALLEST_REAL_CONFIG, read_metrics


def _run(*args, timeout=150):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "tools/train.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _main(*args) -> int:
    """tools/train.py's main() in this process (saves a 10 s interpreter start per call)."""
    spec = importlib.util.spec_from_file_location("detkit_train_cli", REPO / "tools/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


@pytest.mark.slow
def test_cli_outputs_and_resume_after_corrupt_last(shapes_root, tmp_path, capsys):
    work = tmp_path / "work"
    overrides = [f"data.root={shapes_root}", "data.train.batch_size=4", "data.val.batch_size=4",
                 "data.train.num_workers=0", "data.val.num_workers=0", "train.log_interval=1",
                 "train.eval_interval=0",
                 "train.checkpoint.interval=1", "train.checkpoint.keep=1", "train.max_iters=2"]
    proc = _run(SMALLEST_REAL_CONFIG, "--work-dir", work, "--set", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]

    expected = load_config(SMALLEST_REAL_CONFIG, overrides)
    assert yaml.safe_load((work / "config.yaml").read_text()) == expected
    assert load_config(work / "config.yaml") == expected  # the run can be repeated from it
    assert [r["iter"] for r in read_metrics(work)] == [1, 2]
    record = read_metrics(work)[0]
    assert set(record) >= {"loss", "lr", "grad_norm", "time", "data_time", "images_per_s",
                           "skipped_steps"}
    terms = [k for k in record if k.startswith("loss_")]
    assert terms and sum(record[k] for k in terms) == pytest.approx(record["loss"])
    assert "bbox/AP50" in read_metrics(work, "val")[0]
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    names = sorted(p.name for p in work.glob("*.pth"))
    # keep: 1 keeps the previous last.pth as iter_1.pth (never a copy of last.pth); the final
    # evaluation is the best, so final.pth is best.pth under a second name (one file on disk)
    assert names == ["best.pth", "final.pth", "iter_1.pth", "last.pth"]
    assert (work / "final.pth").samefile(work / "best.pth")
    assert load_checkpoint(work / "iter_1.pth")["iter"] == 1
    assert load_checkpoint(work / "best.pth")["meta"]["class_names"] == ["circle", "square",
                                                                          "triangle", "star"]

    data = (work / "last.pth").read_bytes()
    (work / "last.pth").write_bytes(data[: len(data) // 3])
    code = _main(SMALLEST_REAL_CONFIG, "--work-dir", work, "--resume", "--set", *overrides[:-1],
                 "train.max_iters=3")
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    log = out.out + out.err
    assert "last.pth" in log and "truncated or corrupt" in log
    assert f"resumed from {work / 'iter_1.pth'} at iteration 1" in log
    assert [r["iter"] for r in read_metrics(work)] == [1, 2, 3]
    assert load_checkpoint(work / "last.pth")["iter"] == 3


def test_cli_errors_are_one_clear_line(shapes_root, tmp_path, capsys):
    assert _main(SMALLEST_REAL_CONFIG, "--work-dir", tmp_path, "--set", "train.acumulate=2") == 2
    err = capsys.readouterr().err
    assert "did you mean 'accumulate'" in err and "Traceback" not in err
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    code = _main(SMALLEST_REAL_CONFIG, "--work-dir", tmp_path, "--resume", tmp_path / "bad.pth",
                 "--set", f"data.root={shapes_root}", "data.train.num_workers=0")
    assert code == 2
    assert "bad.pth" in capsys.readouterr().err
