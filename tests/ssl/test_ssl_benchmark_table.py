"""The self-supervised benchmark's table: one column per fine-tuning budget, seed means, gains."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from benchmarks import self_supervised as ssl_bench  # noqa: E402


def _write_run(root: Path, name: str, ap50: float, ap: float) -> None:
    run = root / name
    run.mkdir(parents=True)
    records = [{"mode": "train", "iter": 10, "time": 0.5},
               {"mode": "val", "iter": 10, "bbox/AP50": ap50, "bbox/AP": ap}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_run_names_carry_budget_and_seed():
    assert ssl_bench.ft_dir("byol", 0.1, 300, 0) == "ft_byol_0.1_300it"
    assert ssl_bench.ft_dir("scratch", 0.1, 600, 2) == "ft_scratch_0.1_600it_s2"
    match = ssl_bench.FT_DIR.fullmatch("ft_scratch_0.1_600it_s2")
    assert match.groups() == ("0.1", "600", "2")


def test_table_reports_each_budget_with_mean_and_min_seed_gain(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "work_dirs" / "ssl_bench"     # the default --work-dir under the repo
    scratch = {150: [0.30, 0.32], 300: [0.33, 0.34]}
    byol = {150: [0.38, 0.40], 300: [0.35, 0.33]}
    for init, results in (("scratch", scratch), ("byol", byol)):
        for n, per_seed in results.items():
            for seed, ap50 in enumerate(per_seed):
                _write_run(bench, ssl_bench.ft_dir(init, 0.1, n, seed), ap50, ap50 / 2)
    (bench / "byol").mkdir()
    (bench / "recipe.json").write_text(json.dumps(["train.optimizer.lr_mult={backbone: 0.1}"]))
    (bench / "knn.json").write_text(json.dumps({"scratch": 0.6, "scratch/rank": 10.2, "byol": 0.33}))
    monkeypatch.setattr(ssl_bench, "stem_lowpass", lambda weights: 0.16)
    monkeypatch.setattr(ssl_bench, "REPO", tmp_path)
    ssl_bench.run(None)
    header, _, scratch_row, byol_row, recipe = capsys.readouterr().out.splitlines()
    assert "10% labels, 150 it" in header and "10% labels, 300 it" in header
    assert scratch_row.startswith("| scratch |") and "gain" not in scratch_row
    cells = [c.strip() for c in byol_row.split("|")[1:-1]]
    # 150 it: (0.38 + 0.40) / 2, gains +0.08 and +0.08; 300 it: gains +0.02 and -0.01
    assert cells[2] == "0.390 / 0.195 (0.380, 0.400); gain +0.080, min +0.080"
    assert cells[3] == "0.340 / 0.170 (0.350, 0.330); gain +0.005, min -0.010"
    assert recipe.endswith("train.optimizer.lr_mult={backbone: 0.1}")
    assert "c5 eff. rank" in header
    assert [c.strip() for c in scratch_row.split("|")[-4:-1]] == ["0.600", "10.2", "0.16"]
    assert cells[-3:] == ["0.330", "-", "-"]   # k-NN saved before ranks existed; no checkpoint


def test_no_results_names_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ssl_bench, "REPO", tmp_path)
    ssl_bench.run(None)
    assert "no results in" in capsys.readouterr().out
    assert ssl_bench.FT_DIR.fullmatch("ft_scratch_0.1") is None     # the old name, without a budget


def test_effective_rank_sees_dimensional_collapse():
    import torch

    g = torch.Generator().manual_seed(0)
    isotropic = torch.randn(4000, 16, generator=g)
    assert 15.5 < ssl_bench.effective_rank(isotropic) <= 16.0
    # one direction with all but a trace of the variance: what BYOL's c5 features look like here
    direction = torch.randn(16, generator=g)
    collapsed = torch.randn(4000, 1, generator=g) * direction + 0.01 * torch.randn(4000, 16, generator=g)
    assert ssl_bench.effective_rank(collapsed) < 1.1
    # two equal orthogonal directions: exactly 2
    two = torch.zeros(1000, 16)
    two[:500, 0], two[500:, 1] = 1.0, 1.0
    two[::2] *= -1
    assert abs(ssl_bench.effective_rank(two) - 2.0) < 1e-6
