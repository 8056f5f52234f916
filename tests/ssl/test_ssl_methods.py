"""Each method's ``compute()`` against its paper's objective written out here: which encoder sees
which view, one backbone pass per resolution, stop-gradients, DINO's centre and temperature.

The reference losses are computed from the method's own sub-networks (so the weights agree) but
with the formula spelt out pair by pair, never through detkit.ssl.losses.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from ssl_helpers import TINY_DARKNET

from detkit.ssl import build_method

B = 3   # an odd batch: chunking into views must not mix images


def _views(count: int, size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, size, size, generator=g) for _ in range(count)]


def _perturb(module: torch.nn.Module) -> None:
    """Make a momentum copy differ from its online network (at build time they are equal)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _backbone_batches(method, encoder_name: str) -> list[tuple]:
    """Record the input shape of every backbone call of ``method.<encoder_name>``."""
    calls: list[tuple] = []
    getattr(method, encoder_name).backbone.register_forward_hook(
        lambda m, args, out: calls.append(tuple(args[0].shape)))
    return calls


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to float32 summation order, relative to the tensor's size (gradients ~1e2)."""
    return float((a - b).norm()) <= rel * float(b.norm()) + 1e-6


def _cos_rows(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_simclr_encodes_both_views_in_one_pass_and_matches_nt_xent_by_pairs():
    torch.manual_seed(0)
    method = build_method({"type": "SimCLR", "backbone": dict(TINY_DARKNET), "proj_hidden_dim": 16,
                           "proj_dim": 8, "temperature": 0.3})
    calls = _backbone_batches(method, "encoder")
    v1, v2 = _views(2, 32, seed=1)
    loss = method.compute([v1, v2], [])["loss_nt_xent"]
    assert calls == [(2 * B, 3, 32, 32)]           # BatchNorm over all 2B images, as the reference

    with torch.no_grad():
        z = F.normalize(method.encoder(torch.cat([v1, v2])), dim=1)   # rows: view 1 then view 2
    sim = z @ z.t() / 0.3
    terms = []
    for i in range(2 * B):
        partner = (i + B) % (2 * B)
        others = [math.exp(sim[i, k]) for k in range(2 * B) if k != i]
        terms.append(-math.log(math.exp(sim[i, partner]) / sum(others)))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    separate = torch.cat([method.encoder(v1), method.encoder(v2)])
    assert not torch.allclose(separate, method.encoder(torch.cat([v1, v2])), atol=1e-4)  # BN sees it


def test_byol_pairs_each_prediction_with_the_other_views_target_under_stop_gradient():
    torch.manual_seed(0)
    method = build_method({"type": "BYOL", "backbone": dict(TINY_DARKNET), "proj_hidden_dim": 16,
                           "proj_dim": 8, "pred_hidden_dim": 16})
    _perturb(method.target)
    x1, x2 = _views(2, 32, seed=2)
    loss = method.compute([x1, x2], [])["loss_byol"]
    loss.backward()
    got = _grads(method.online)
    assert all(p.grad is None for p in method.target.parameters())

    method.zero_grad()
    p1, p2 = method.predictor(method.online(x1)), method.predictor(method.online(x2))
    with torch.no_grad():
        t1, t2 = method.target(x1), method.target(x2)
    expected = (2 - 2 * _cos_rows(p1, t2)).mean() + (2 - 2 * _cos_rows(p2, t1)).mean()
    swapped = (2 - 2 * _cos_rows(p1, t1)).mean() + (2 - 2 * _cos_rows(p2, t2)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - swapped.item()) > 1e-3
    expected.backward()
    for a, b in zip(got, _grads(method.online)):
        assert _close(a, b)


def test_simsiam_stops_the_gradient_of_the_projections_it_regresses():
    torch.manual_seed(0)
    method = build_method({"type": "SimSiam", "backbone": dict(TINY_DARKNET), "proj_dim": 16,
                           "pred_hidden_dim": 8})
    x1, x2 = _views(2, 32, seed=3)
    method.compute([x1, x2], [])["loss_simsiam"].backward()
    got = _grads(method.encoder)

    def hand(stop: bool):
        method.zero_grad()
        z1, z2 = method.encoder(x1), method.encoder(x2)
        p1, p2 = method.predictor(z1), method.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop else (z1, z2)
        loss = -0.5 * _cos_rows(p1, t2).mean() - 0.5 * _cos_rows(p2, t1).mean()
        loss.backward()
        return _grads(method.encoder)

    with_stop, without = hand(True), hand(False)
    assert all(_close(a, b) for a, b in zip(got, with_stop))
    assert not all(_close(a, b, rel=1e-2) for a, b in zip(got, without))


def test_moco_queries_view_one_keys_view_two_against_the_queue_before_it_is_updated():
    torch.manual_seed(0)
    method = build_method({"type": "MoCoV2", "backbone": dict(TINY_DARKNET), "proj_hidden_dim": 16,
                           "proj_dim": 8, "queue_size": 5, "temperature": 0.2})
    _perturb(method.encoder_k)
    queue = method.queue.clone()
    x1, x2 = _views(2, 32, seed=4)
    loss = method.compute([x1, x2], [])["loss_infonce"]
    loss.backward()
    assert all(p.grad is None for p in method.encoder_k.parameters())

    q = F.normalize(method.encoder_q(x1), dim=1).detach()
    with torch.no_grad():
        k = F.normalize(method.encoder_k(x2), dim=1)  # one process: Shuffle BN's permutation is a no-op
    terms = []
    for i in range(B):
        positive = math.exp(float(q[i] @ k[i]) / 0.2)
        negatives = sum(math.exp(float(q[i] @ n) / 0.2) for n in queue)
        terms.append(-math.log(positive / (positive + negatives)))
    assert loss.item() == pytest.approx(sum(terms) / B, rel=1e-5)
    # the batch's keys replaced the oldest B of the 5 queue entries
    assert torch.allclose(method.queue[:B], k, atol=1e-5) and torch.equal(method.queue[B:], queue[B:])
    assert int(method.queue_ptr) == B


def _dino(**kw):
    torch.manual_seed(0)
    method = build_method({"type": "DINO", "backbone": dict(TINY_DARKNET), "hidden_dim": 16,
                           "bottleneck_dim": 8, "out_dim": 12, "student_temp": 0.1,
                           "teacher_temp": 0.04, "center_momentum": 0.9, **kw})
    _perturb(method.teacher)
    with torch.no_grad():
        method.center.normal_()
    return method


def test_dino_teacher_sees_the_globals_once_student_one_pass_per_resolution():
    method = _dino()
    student_calls, teacher_calls = _backbone_batches(method, "student"), _backbone_batches(method, "teacher")
    globals_, locals_ = _views(2, 32, seed=5), _views(3, 16, seed=6)
    center = method.center.clone()
    loss = method.compute(globals_, locals_)["loss_dino"]
    assert teacher_calls == [(2 * B, 3, 32, 32)]
    assert student_calls == [(2 * B, 3, 32, 32), (3 * B, 3, 16, 16)]
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())

    with torch.no_grad():
        s = (list(method.student(torch.cat(globals_)).chunk(2))
             + list(method.student(torch.cat(locals_)).chunk(3)))
        t = list(method.teacher(torch.cat(globals_)).chunk(2))
    total, pairs = 0.0, 0
    for i in range(2):                                    # teacher global view i
        target = F.softmax((t[i] - center) / 0.04, dim=1)
        for v in range(5):                                # every other student view
            if v != i:
                total += float((-(target * F.log_softmax(s[v] / 0.1, dim=1)).sum(1)).mean())
                pairs += 1
    assert pairs == 8 and loss.item() == pytest.approx(total / pairs, rel=1e-5)
    # centre: EMA of the teacher's mean output over every global view of the batch
    expected_center = 0.9 * center + 0.1 * torch.cat(t).mean(0, keepdim=True)
    assert torch.allclose(method.center, expected_center, atol=1e-6)


def test_dino_teacher_temperature_warms_up_linearly_then_stays():
    method = _dino(warmup_teacher_temp=0.07, warmup_fraction=0.5)
    seen = []
    for step in (0, 25, 50, 75, 100):
        if step:
            method.after_optimizer_step(step, 100)
        seen.append(method.current_teacher_temp())
    assert seen == pytest.approx([0.07, 0.055, 0.04, 0.04, 0.04])
    # the loss uses it: the same inputs at step 0 and after the warm-up give different losses
    cold = _dino(warmup_teacher_temp=0.07, warmup_fraction=0.5)
    views = _views(2, 32, seed=7)
    early = cold.compute(views, [])["loss_dino"].item()
    cold.center.copy_(_dino().center)      # same centre for both computations
    cold.after_optimizer_step(100, 100)
    teacher_after = cold.teacher.state_dict()
    warm = _dino(warmup_teacher_temp=0.07, warmup_fraction=0.5)
    warm.teacher.load_state_dict(teacher_after)
    warm.progress.fill_(1.0)
    assert warm.current_teacher_temp() == 0.04 and cold.current_teacher_temp() == 0.04
    assert early != pytest.approx(warm.compute(views, [])["loss_dino"].item(), rel=1e-4)
