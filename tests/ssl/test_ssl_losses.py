"""Each objective on a hand-sized case against its paper's formula, written out term by term."""

import math

import pytest
import torch

from detkit.ssl.losses import (
    byol_regression,
    dino_cross_entropy,
    info_nce,
    negative_cosine,
    normalised_std,
    nt_xent,
)


def unit(rows):
    return [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def cos(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


def test_info_nce_with_a_known_queue():
    # MoCo eq. (1): L_q = -log exp(q.k+/t) / (exp(q.k+/t) + sum_i exp(q.k_i/t))
    q = unit([[1.0, 0.0, 1.0], [0.2, 0.9, -0.4]])
    k = unit([[0.9, 0.1, 1.1], [0.0, 1.0, 0.0]])
    queue = unit([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.5], [0.0, -1.0, 1.0], [0.3, 0.3, 0.3]])
    t = 0.2
    expected = 0.0
    for qi, ki in zip(q, k):
        pos = math.exp(dot(qi, ki) / t)
        expected += -math.log(pos / (pos + sum(math.exp(dot(qi, n) / t) for n in queue)))
    expected /= len(q)
    got = info_nce(torch.tensor(q), torch.tensor(k), torch.tensor(queue), t)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_two_images_two_views():
    # SimCLR: l(i,j) = -log exp(sim(z_i,z_j)/t) / sum_{k != i} exp(sim(z_i,z_k)/t) over the 2N
    # views, L = 1/(2N) sum_k [l(2k-1,2k) + l(2k,2k-1)]. Views interleaved as in the paper.
    z1 = [[1.0, 2.0, 0.0], [0.5, -1.0, 1.0]]       # view 1 of images 1 and 2
    z2 = [[0.8, 2.2, 0.3], [-0.2, -1.0, 0.9]]      # view 2
    views = [z1[0], z2[0], z1[1], z2[1]]
    t = 0.5

    def loss(i, j):
        denominator = sum(math.exp(cos(views[i], views[k]) / t) for k in range(4) if k != i)
        return -math.log(math.exp(cos(views[i], views[j]) / t) / denominator)

    expected = sum(loss(2 * k, 2 * k + 1) + loss(2 * k + 1, 2 * k) for k in range(2)) / 4
    assert nt_xent(torch.tensor(z1), torch.tensor(z2), t).item() == pytest.approx(expected, rel=1e-5)


def test_byol_and_simsiam_cosine_terms():
    p = [[1.0, 2.0, -1.0], [0.0, 1.0, 3.0]]
    z = [[2.0, 1.0, 0.0], [1.0, -1.0, 2.0]]
    # BYOL eq. (2): || p/|p| - z/|z| ||^2, batch mean
    byol = 0.0
    for pi, zi in zip(unit(p), unit(z)):
        byol += sum((a - b) ** 2 for a, b in zip(pi, zi))
    assert byol_regression(torch.tensor(p), torch.tensor(z)).item() == pytest.approx(byol / 2, rel=1e-5)
    # SimSiam eq. (1): D(p, z) = -p/|p| . z/|z|, batch mean; z under stop-gradient
    simsiam = -sum(cos(a, b) for a, b in zip(p, z)) / 2
    pt, zt = torch.tensor(p, requires_grad=True), torch.tensor(z, requires_grad=True)
    d = negative_cosine(pt, zt)
    assert d.item() == pytest.approx(simsiam, rel=1e-5)
    d.backward()
    assert zt.grad is None and pt.grad is not None and pt.grad.abs().sum() > 0


def test_dino_cross_entropy_with_centre():
    # DINO: H(P_t, P_s) = -sum P_t log P_s, P_t = softmax((g_t - C)/tau_t), P_s = softmax(g_s/tau_s),
    # averaged over pairs (teacher global view i, student view v != i).
    teacher = [[[1.0, 0.0, 2.0]], [[0.5, 1.5, -1.0]]]                # 2 global views, batch 1
    student = [[[0.2, 0.1, 1.0]], [[1.0, 1.0, 0.0]], [[-0.5, 2.0, 0.3]]]   # + 1 local view
    center = [0.3, -0.2, 0.1]
    tau_s, tau_t = 0.1, 0.04

    def softmax(v, tau):
        e = [math.exp(x / tau - max(v) / tau) for x in v]
        return [x / sum(e) for x in e]

    terms = []
    for i, t in enumerate(teacher):
        pt = softmax([a - c for a, c in zip(t[0], center)], tau_t)
        for v, s in enumerate(student):
            if v != i:
                ps = softmax(s[0], tau_s)
                terms.append(-sum(a * math.log(b) for a, b in zip(pt, ps)))
    got = dino_cross_entropy([torch.tensor(s) for s in student], [torch.tensor(t) for t in teacher],
                             torch.tensor([center]), tau_s, tau_t)
    assert len(terms) == 4
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)


def test_normalised_std_sees_collapse():
    spread = torch.eye(8)
    collapsed = torch.ones(8, 8) + 1e-6 * torch.randn(8, 8)
    assert normalised_std(spread).item() > 0.9
    assert normalised_std(collapsed).item() < 1e-3
