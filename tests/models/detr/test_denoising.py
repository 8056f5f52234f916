"""Contrastive denoising queries: equal to transformers' builder under the same seed, and the
properties the scheme promises (group layout, mask, noise ranges, seeding, empty images)."""

import pytest
import torch
from transformers.models.rt_detr.modeling_rt_detr import get_contrastive_denoising_training_group

from detkit.models.detr.denoising import contrastive_denoising_queries
from detkit.models.detr.position import cxcywh_to_xyxy

NUM_CLASSES = 7


def _targets(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centers = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        out.append({"labels": labels, "boxes": torch.cat([centers, sizes], 1)})
    return out


@pytest.mark.parametrize("counts,num_denoising", [([3, 0, 5], 20), ([1, 2], 7), ([4], 3)])
def test_equals_transformers_under_the_same_seed(counts, num_denoising):
    targets = _targets(counts)
    embed = torch.nn.Embedding(NUM_CLASSES + 1, 16, padding_idx=NUM_CLASSES)
    torch.manual_seed(7)
    ref_embed, ref_boxes, ref_mask, ref_meta = get_contrastive_denoising_training_group(
        [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets], NUM_CLASSES, 11, embed,
        num_denoising_queries=num_denoising, label_noise_ratio=0.5, box_noise_scale=1.0)
    torch.manual_seed(7)
    ours = contrastive_denoising_queries(targets, num_classes=NUM_CLASSES, num_queries=11, label_embed=embed,
                                         num_denoising=num_denoising)
    assert torch.equal(ours.embeddings, ref_embed)
    assert torch.allclose(ours.box_logits, ref_boxes, atol=1e-6)
    assert torch.equal(ours.attn_mask, ref_mask)
    assert ours.meta["dn_num_group"] == ref_meta["dn_num_group"]
    assert ours.meta["dn_num_split"] == ref_meta["dn_num_split"]
    assert all(torch.equal(a, b) for a, b in zip(ours.meta["dn_positive_idx"], ref_meta["dn_positive_idx"]))


def test_layout_mask_and_noise_ranges():
    counts = [2, 0, 3]
    targets = _targets(counts, seed=1)
    embed = torch.nn.Embedding(NUM_CLASSES + 1, 8, padding_idx=NUM_CLASSES)
    dn = contrastive_denoising_queries(targets, num_classes=NUM_CLASSES, num_queries=5, label_embed=embed,
                                       num_denoising=12, label_noise_ratio=0.0, box_noise_scale=0.4,
                                       generator=torch.Generator().manual_seed(0))
    groups, group = 4, 2 * 3                       # 12 // max(counts) groups of positives + negatives
    assert dn.meta["dn_num_group"] == groups and dn.meta["dn_num_split"] == [groups * group, 5]
    assert [len(i) for i in dn.meta["dn_positive_idx"]] == [n * groups for n in counts]
    assert dn.meta["dn_positive_idx"][2].tolist()[:3] == [0, 1, 2]     # first copy in each group
    mask = dn.attn_mask == 0
    total = groups * group
    for g in range(groups):
        block = slice(g * group, (g + 1) * group)
        assert mask[block, block].all()                      # a group sees itself ...
        assert mask[block, total:].all()                     # ... and the matching queries
        assert mask[block, :total].sum() == group * group    # ... and no other group
    assert not mask[total:, :total].any() and mask[total:, total:].all()
    # label_noise_ratio 0: the labels are exactly the targets' (padding rows embed to zero)
    assert torch.equal(dn.embeddings[0, :2], embed(targets[0]["labels"]))
    assert torch.all(dn.embeddings[0, 2:3] == 0)
    # box noise: positives move each corner by less than scale * half size, negatives by 1-2 times
    truth = cxcywh_to_xyxy(targets[2]["boxes"])
    half = (targets[2]["boxes"][:, 2:] * 0.5).repeat(1, 2) * 0.4
    noisy = cxcywh_to_xyxy(dn.box_logits[2].sigmoid())
    for g in range(groups):
        pos = (noisy[g * group:g * group + 3] - truth).abs() / half
        neg = (noisy[g * group + 3:g * group + 6] - truth).abs() / half
        assert pos.max() < 1 + 1e-4
        negatives = noisy[g * group + 3:g * group + 6]
        unclipped = (negatives > 1e-4) & (negatives < 1 - 1e-4)
        assert neg[unclipped].min() > 1 - 1e-4 and neg.max() < 2 + 1e-4


def test_generator_seeds_the_noise_and_labels_flip_at_the_ratio():
    targets = _targets([40, 25], seed=2)
    embed = torch.nn.Embedding(NUM_CLASSES + 1, 4, padding_idx=NUM_CLASSES)

    def build(seed):
        return contrastive_denoising_queries(targets, num_classes=NUM_CLASSES, num_queries=3,
                                             label_embed=embed, num_denoising=400, label_noise_ratio=0.6,
                                             generator=torch.Generator().manual_seed(seed))

    a, b, c = build(0), build(0), build(1)
    assert torch.equal(a.box_logits, b.box_logits) and torch.equal(a.embeddings, b.embeddings)
    assert not torch.equal(a.box_logits, c.box_logits)
    # flipped to a random class with prob 0.3 (which may be the same class): changed ~ 0.3 * 6/7
    rows = embed.weight[:NUM_CLASSES]
    labels = (a.embeddings[0][:, None, :] == rows[None]).all(-1).float().argmax(-1)
    truth = targets[0]["labels"].repeat(2 * a.meta["dn_num_group"])
    changed = (labels != truth).float().mean()
    assert 0.2 < changed < 0.32


def test_nothing_to_denoise_gives_none():
    embed = torch.nn.Embedding(NUM_CLASSES + 1, 4)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    kw = dict(num_classes=NUM_CLASSES, num_queries=3, label_embed=embed)
    assert contrastive_denoising_queries(empty, **kw) is None
    assert contrastive_denoising_queries(_targets([2]), num_denoising=0, **kw) is None
