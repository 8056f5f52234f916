"""A real 2-process gloo run: every rank returns the same metrics as one process on all data.

Rank shards follow DistributedSampler's padding: the last image is repeated on rank 1, so the
evaluators must also drop duplicates.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.multiprocessing as mp

from evaluation_helpers import build_inputs, evaluate_all, worker


@pytest.mark.slow
def test_gloo_two_ranks_equal_single_process(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    gt, coco_preds, voc, seg = build_inputs()
    expected = evaluate_all([({"image_id": k}, v) for k, v in sorted(coco_preds.items())], voc, seg, gt)
    results = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    for name in ("coco", "voc", "seg"):
        for r in range(2):
            assert results[r][name].keys() == expected[name].keys()
            for key, value in expected[name].items():
                got = results[r][name][key]
                assert got == value or (got != got and value != value), (name, r, key, got, value)
