"""Fault tolerance under ``torchrun --max-restarts`` (2 processes, gloo, CPU, deterministic).

Killed workers (SIGKILL after a step, in a forward pass, inside a checkpoint save, before the first
checkpoint) and a preempted job (SIGTERM to torchrun) must finish with exactly the losses of an
uninterrupted run and one metrics record per iteration. The toy detector keeps a try to seconds.
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from detkit.config import dump_config, load_config
from detkit.engine import Trainer, load_checkpoint
from detkit.engine.dist import _agree_on_prefix, init_distributed
from detkit.engine.preemption import TrainingInterrupted, ignore_sigterm_in_workers
from detkit.engine.setup import DIST_DEFAULTS, dist_settings
from detkit.registry import ConfigError

from engine_helpers import REPO, base_config, read_metrics

ITERS = 8  # 16 images, 2 ranks x batch 2: 4 iterations per epoch, so two epochs
COMPARED = ("loss", "loss_box", "loss_cls", "lr", "grad_norm")


def _config(root, workers: int = 0, **checkpoint) -> dict:
    cfg = base_config(root, toy=True, iters=ITERS, batch=2, workers=workers, deterministic=True,
                      checkpoint={"interval": 2, "keep": 0, "best_metric": None, **checkpoint})
    cfg["data"]["val"] = None  # no evaluation: it adds nothing to what is tested here
    return cfg


def _torchrun(cfg_path, work_dir, *, restarts: int, faults: str = "", timeout: float = 300):
    """restart_worker.py (tools/train.py with scripted faults) under torchrun --resume."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DETKIT_TEST_FAULTS=faults)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), str(REPO / "tests/engine/restart_worker.py"),
           str(cfg_path), "--work-dir", str(work_dir), "--resume"]
    proc = _run(cmd, env=env, timeout=timeout)
    return proc, proc.stdout + proc.stderr


def _run(cmd: list[str], *, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run``, but a torchrun that overran gets SIGTERM first: it then stops its
    workers (each in a session of its own, which a plain kill of torchrun would leave running)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            finally:
                proc.kill()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def uninterrupted(shapes_root, tmp_path_factory):
    """Metrics records and final checkpoint of the same 2-process run without any fault."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    dump_config(_config(shapes_root), tmp / "cfg.yaml")
    proc, log = _torchrun(tmp / "cfg.yaml", tmp / "work", restarts=0)
    assert proc.returncode == 0, log[-4000:]
    return read_metrics(tmp / "work"), load_checkpoint(tmp / "work" / "last.pth")


def _assert_same_run(work_dir, uninterrupted) -> None:
    records, reference_last = uninterrupted
    got = read_metrics(work_dir)
    assert [r["iter"] for r in got] == list(range(1, ITERS + 1))  # each iteration exactly once
    for a, b in zip(got, records):
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}, a["iter"]
    last = load_checkpoint(work_dir / "last.pth")
    assert last["iter"] == ITERS
    for k, v in reference_last["model"].items():
        assert torch.equal(last["model"][k], v), k


@pytest.mark.slow
def test_killed_workers_recover_every_time(shapes_root, tmp_path, uninterrupted):
    # One fault per restart: a kill before the first checkpoint (fresh start), after a logged
    # iteration past the checkpoint (its record must not stay twice), inside a save (the half
    # temporary file is dropped, the older last.pth used), in a forward pass while the peer waits,
    # right after a checkpoint, and in the final save. Each restart reuses torchrun's store, where
    # the killed round's addresses are still published.
    dump_config(_config(shapes_root), tmp_path / "cfg.yaml")
    faults = "1:1:step,0:3:step,0:4:save,1:5:forward,1:6:step,0:8:save"
    proc, log = _torchrun(tmp_path / "cfg.yaml", tmp_path / "work", restarts=6, faults=faults)
    assert proc.returncode == 0, log[-6000:]
    starts = [line.split(" at iteration ")[-1] for line in log.splitlines()
              if line.startswith(("resumed from", "--resume: no checkpoint"))]
    assert starts == ["--resume: no checkpoint in " + str(tmp_path / "work") + "; starting from scratch",
                      "--resume: no checkpoint in " + str(tmp_path / "work") + "; starting from scratch",
                      "2", "2", "4", "6", "6"], log[-6000:]
    assert not list((tmp_path / "work").glob(".*.tmp.*"))
    _assert_same_run(tmp_path / "work", uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_at_the_next_iteration_and_resume_continues_there(shapes_root, tmp_path,
                                                                         uninterrupted):
    # Periodic checkpoints at 3 and 6; torchrun is sent SIGTERM after iteration 4 and forwards it
    # to both workers' process groups, DataLoader workers included, which must not die of it: the
    # ranks finish iteration 5, save it and exit 143. (Data order and augmentation do not depend
    # on the number of loader workers, so the reference run has none.)
    dump_config(_config(shapes_root, workers=1, interval=3), tmp_path / "cfg.yaml")
    proc, log = _torchrun(tmp_path / "cfg.yaml", tmp_path / "work", restarts=0, faults="1:4:term")
    assert proc.returncode != 0
    assert "SIGTERM: saved last.pth at iteration 5 of 8" in log, log[-4000:]
    assert "stopped by SIGTERM: saved last.pth at iteration 5; continue with --resume" in log
    assert load_checkpoint(tmp_path / "work" / "last.pth")["iter"] == 5

    proc, log = _torchrun(tmp_path / "cfg.yaml", tmp_path / "work", restarts=0)
    assert proc.returncode == 0, log[-4000:]
    assert f"resumed from {tmp_path / 'work' / 'last.pth'} at iteration 5" in log
    _assert_same_run(tmp_path / "work", uninterrupted)


def test_sigterm_in_one_process_stops_after_the_current_iteration(shapes_root, tmp_path):
    cfg = _config(shapes_root, interval=ITERS)
    trainer = Trainer(cfg, tmp_path)
    run_step = trainer.run_step

    def run_step_signalled(batches):
        if trainer.iter == 2:  # during iteration 3, before its losses are reduced
            os.kill(os.getpid(), signal.SIGTERM)
        return run_step(batches)

    trainer.run_step = run_step_signalled
    missed = []  # SIGTERMs the trainer did not take (without this guard one would end pytest)

    def guard(signum, frame):
        missed.append(signum)

    previous = signal.signal(signal.SIGTERM, guard)
    try:
        with pytest.raises(TrainingInterrupted) as info:
            trainer.train()
        assert signal.getsignal(signal.SIGTERM) is guard  # the trainer put the handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not missed
    assert info.value.iteration == 3 and info.value.exit_code == 143
    assert load_checkpoint(tmp_path / "last.pth")["iter"] == 3
    assert [r["iter"] for r in read_metrics(tmp_path)] == [1, 2, 3]


class _WorkerPid(torch.utils.data.Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, index):
        return os.getpid()


def test_loader_workers_ignore_a_foreign_sigterm_and_end_on_the_trainers():
    loader = torch.utils.data.DataLoader(_WorkerPid(), batch_size=None, num_workers=1)
    ignore_sigterm_in_workers(loader)
    batches = iter(loader)
    pid = next(batches)
    # From another process, as torchrun's SIGTERM to the process group: the worker keeps serving
    # (a dead worker fails the next batches it has not prefetched yet).
    subprocess.run(["kill", "-TERM", str(pid)], check=True)
    assert [next(batches) for _ in range(60)] == [pid] * 60
    # From the trainer, as torch's last resort at shutdown: the worker ends quietly.
    (worker,) = [p for p in multiprocessing.active_children() if p.pid == pid]
    os.kill(pid, signal.SIGTERM)
    worker.join(30)
    assert worker.exitcode == 0
    del batches


def test_dist_settings_are_documented_and_checked():
    assert load_config(REPO / "configs/_base_/runtime.yaml")["dist"] == DIST_DEFAULTS
    assert dist_settings({"dist": {"timeout_minutes": 2}}) == {**DIST_DEFAULTS, "timeout_minutes": 2.0}
    with pytest.raises(ConfigError, match="dist.timeout_minuts.*did you mean 'timeout_minutes'"):
        dist_settings({"dist": {"timeout_minuts": 2}})
    with pytest.raises(ConfigError, match="dist.init_timeout_minutes: expected a number of minutes > 0"):
        dist_settings({"dist": {"init_timeout_minutes": 0}})


def _agree(port: int, ranks: list[int], world_size: int) -> dict[int, str]:
    """_agree_on_prefix for ``ranks`` in threads (started in that order) against one store."""
    out: dict[int, str] = {}

    def run(rank):
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=20))
        out[rank] = _agree_on_prefix(store, rank, world_size, deadline=time.monotonic() + 20)

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_every_launch_agrees_on_a_fresh_prefix_whatever_the_store_holds():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    first = _agree(server.port, [0, 1, 2], 3)
    assert len(first) == 3 and len(set(first.values())) == 1
    # A later launch on the same store, ranks > 0 arriving before rank 0 (the case where a rank
    # reads what the earlier launch left); then a launch whose rank 2 had died before asking.
    second = _agree(server.port, [2, 1, 0], 3)
    assert len(set(second.values())) == 1 and second[0] != first[0]
    server.add("detkit/join/tickets", 1)  # a ticket nobody answered
    third = _agree(server.port, [1, 0, 2], 3)
    assert len(set(third.values())) == 1 and third[0] not in (first[0], second[0])


def test_join_failure_is_one_error_naming_rank_and_address(monkeypatch):
    with socket_bound_elsewhere() as port:
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # only a client, as under torchrun
        with pytest.raises(RuntimeError, match=rf"rank 1 of 2 could not join .* 127\.0\.0\.1:{port} "
                                               rf"within 3 s \(\d+ tries\)"):
            init_distributed(init_timeout_minutes=0.05)
    assert not dist.is_initialized()


class socket_bound_elsewhere:
    """A port with nothing listening on it (bound, never listened, so no one else takes it)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


HANG = """
import sys, time
import torch
from detkit.engine.dist import init_distributed, all_reduce_tensor
info = init_distributed(timeout_minutes=float(sys.argv[1]))
if info.rank == 1:
    time.sleep(600)  # a rank stuck outside the collective
all_reduce_tensor(torch.ones(1))
"""


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_within_dist_timeout(tmp_path):
    (tmp_path / "hang.py").write_text(HANG)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "hang.py"), "0.05"]  # 3 s instead of the default 30 minutes
    proc = _run(cmd, env=env, timeout=120)
    assert proc.returncode != 0
    assert "Timed out waiting 3000ms" in proc.stderr, proc.stderr[-3000:]


FAIL_FIRST_JOIN = """
import atexit
import os
import torch
import torch.distributed as dist
from detkit.engine.dist import all_reduce_tensor, init_distributed
# atexit runs handlers last-in first-out: this one runs after init_distributed's cleanup.
atexit.register(lambda: print(f"rank {os.environ['RANK']}: group alive at exit: {dist.is_initialized()}",
                              flush=True))
if os.environ["RANK"] == "1":
    real, calls = dist.init_process_group, []

    def fail_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Connection refused (injected)")
        return real(*args, **kwargs)

    dist.init_process_group = fail_first
info = init_distributed(init_timeout_minutes=0.5)
print(f"rank {info.rank}: sum {float(all_reduce_tensor(torch.ones(1)))}", flush=True)
"""


@pytest.mark.slow
def test_a_failed_join_is_retried_by_every_rank(tmp_path):
    # Rank 1 fails right after the handshake; rank 0, already connecting under that prefix, gives
    # its try up after a third of the 30 s and both meet under a new prefix.
    (tmp_path / "join.py").write_text(FAIL_FIRST_JOIN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "join.py")]
    proc = _run(cmd, env=env, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "rank 0: sum 2.0" in proc.stdout and "rank 1: sum 2.0" in proc.stdout
    # The group is destroyed at exit although the script never does it: a retried gloo join left
    # alive into interpreter teardown aborted rank 0 in about 1 of 4 runs under load.
    assert "rank 0: group alive at exit: False" in proc.stdout
    assert "rank 1: group alive at exit: False" in proc.stdout
    assert "warning (rank 1): joining the process group at" in proc.stderr
    assert "failed (Connection refused (injected)); retrying in 1 s" in proc.stderr
    assert "warning (rank 0): joining the process group at" in proc.stderr
