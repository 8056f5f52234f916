"""SetCriterion and its loss terms against transformers' RTDetrLoss, DFineLoss and Deimv2Loss on
the same predictions, targets and matching (transformers' key names adapted: ``logits``,
``class_labels``, ``auxiliary_outputs`` with the encoder set appended, ``dn_auxiliary_outputs``,
``denoising_meta_values``); empty images, a hand-computed varifocal loss and gradients."""

import math

import pytest
import torch
from transformers import Deimv2Config, DFineConfig, RTDetrConfig
from transformers.loss.loss_d_fine import DFineLoss
from transformers.loss.loss_deimv2 import Deimv2Loss
from transformers.loss.loss_for_object_detection import sigmoid_focal_loss as hf_sigmoid_focal_loss
from transformers.loss.loss_rt_detr import RTDetrLoss

from detkit.models.detr.criterion import SetCriterion, union_of_matches
from detkit.models.detr.losses import focal_loss, varifocal_loss

NUM_CLASSES, QUERIES, LAYERS, GROUPS, REG_MAX = 5, 11, 3, 2, 8


def make_targets(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
             "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2,
                                 torch.rand(n, 2, generator=g) * 0.25 + 0.05], 1)} for n in counts]


def layer_set(targets, num_queries, g, dfine, dn_positive=None, up=0.5, reg_scale=4.0):
    """{pred_logits, pred_boxes (+ D-FINE's pred_corners, ref_points)}: the first queries near the
    targets (or the denoising positives on them), the rest random."""
    batch = len(targets)
    boxes = torch.cat([torch.rand(batch, num_queries, 2, generator=g) * 0.8 + 0.1,
                       torch.rand(batch, num_queries, 2, generator=g) * 0.3 + 0.05], -1)
    for b, t in enumerate(targets):
        n = t["boxes"].shape[0]
        where = dn_positive[b] if dn_positive is not None else torch.arange(min(n, num_queries))
        source = t["boxes"].repeat(GROUPS, 1) if dn_positive is not None else t["boxes"][:where.numel()]
        boxes[b, where] = source + 0.03 * torch.randn(source.shape, generator=g)
    out = {"pred_logits": torch.randn(batch, num_queries, NUM_CLASSES, generator=g) * 2,
           "pred_boxes": boxes.clamp(0.01, 0.99)}
    if dfine:
        out["pred_corners"] = torch.randn(batch, num_queries, 4 * (REG_MAX + 1), generator=g) * 2
        out["ref_points"] = (boxes + 0.05 * torch.randn(boxes.shape, generator=g)).clamp(0.02, 0.98)
        out["up"], out["reg_scale"] = torch.tensor([up]), torch.tensor([reg_scale])
    return out


def make_outputs(targets, dfine=False, denoising=True, seed=1, **constants):
    """A raw-output dict as the DETR heads assemble it (detr/outputs.py)."""
    g = torch.Generator().manual_seed(seed)
    layers = [layer_set(targets, QUERIES, g, dfine, **constants) for _ in range(LAYERS)]
    if dfine:
        teacher = {"teacher_corners": layers[-1]["pred_corners"], "teacher_logits": layers[-1]["pred_logits"]}
        layers = [{**layer, **teacher} for layer in layers[:-1]] + [layers[-1]]
    outputs = {**layers[-1], "aux_outputs": layers[:-1],
               "enc_aux_outputs": [layer_set(targets, QUERIES, g, dfine=False)]}
    if denoising:
        max_n = max(t["labels"].shape[0] for t in targets)
        positive = [torch.cat([torch.arange(t["labels"].shape[0]) + 2 * max_n * grp for grp in range(GROUPS)])
                    for t in targets]
        dn = [layer_set(targets, 2 * max_n * GROUPS, g, dfine, positive, **constants) for _ in range(LAYERS)]
        if dfine:
            teacher = {"teacher_corners": dn[-1]["pred_corners"], "teacher_logits": dn[-1]["pred_logits"]}
            dn = [{**layer, **teacher} for layer in dn]
        outputs["dn_outputs"] = dn
        outputs["dn_meta"] = {"dn_positive_idx": positive, "dn_num_group": GROUPS,
                              "dn_num_split": [2 * max_n * GROUPS, QUERIES]}
    return outputs


def to_transformers(outputs, targets, top_level_corners=False):
    """The same dicts under transformers' names; its encoder set is the last auxiliary one."""
    def rename(layer):
        return {("logits" if k == "pred_logits" else k): v for k, v in layer.items()
                if k not in ("up", "reg_scale")}
    hf = rename({k: v for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")
                 or (top_level_corners and k in ("pred_corners", "ref_points"))})
    hf["auxiliary_outputs"] = [rename(o) for o in outputs["aux_outputs"] + outputs["enc_aux_outputs"]]
    if "dn_outputs" in outputs:
        hf["dn_auxiliary_outputs"] = [rename(o) for o in outputs["dn_outputs"]]
        hf["denoising_meta_values"] = outputs["dn_meta"]
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    return hf, hf_targets


def our_key(hf_key):
    """transformers' ``_aux_{L-1}`` is the encoder set, ``_enc_0`` here."""
    return hf_key.replace(f"_aux_{LAYERS - 1}", "_enc_0")


def compare(ours, theirs):
    """Every transformers key has an equal detkit key; returns the max abs difference."""
    worst = 0.0
    for key, value in theirs.items():
        mine = ours[our_key(key)]
        assert torch.allclose(mine, value.float(), rtol=1e-5, atol=1e-5), (key, mine.item(), value.item())
        worst = max(worst, (mine - value).abs().item())
    return worst


def hf_config(cls, **kw):
    return cls(num_labels=NUM_CLASSES, max_num_bins=REG_MAX, **kw)


def test_rtdetr_losses_equal_transformers():
    targets = make_targets([3, 0, 6, 1])
    outputs = make_outputs(targets)
    ours = SetCriterion(num_classes=NUM_CLASSES, per_layer_keys=True)(outputs, targets)
    theirs = RTDetrLoss(RTDetrConfig(num_labels=NUM_CLASSES))(*to_transformers(outputs, targets))
    assert len(theirs) == 3 * (2 * LAYERS + 1) and set(map(our_key, theirs)) == set(ours)
    compare(ours, theirs)


def test_grouped_keys_sum_the_per_layer_keys():
    targets = make_targets([2, 4])
    outputs = make_outputs(targets, dfine=True)
    per_layer = SetCriterion(num_classes=NUM_CLASSES, per_layer_keys=True)(outputs, targets)
    grouped = SetCriterion(num_classes=NUM_CLASSES)(outputs, targets)
    sets = ("", "_aux", "_enc", "_dn")
    assert set(grouped) == {f"loss_{t}{s}" for t in ("vfl", "bbox", "giou") for s in sets} \
        | {f"loss_{t}{s}" for t in ("fgl", "ddf") for s in ("_aux", "_dn")} | {"loss_fgl"}
    assert torch.allclose(sum(grouped.values()), sum(per_layer.values()), rtol=1e-6)
    aux_sum = per_layer["loss_giou_aux_0"] + per_layer["loss_giou_aux_1"]
    assert torch.allclose(grouped["loss_giou_aux"], aux_sum)


@pytest.mark.parametrize("counts,up,reg_scale", [([3, 0, 6, 1], 0.5, 4.0), ([5], 0.7, 2.5)])
def test_dfine_losses_equal_transformers(counts, up, reg_scale):
    """The second case's weighting-function constants come from the layer dicts only."""
    targets = make_targets(counts, seed=len(counts))
    outputs = make_outputs(targets, dfine=True, seed=3, up=up, reg_scale=reg_scale)
    criterion = SetCriterion(num_classes=NUM_CLASSES, per_layer_keys=True)
    ours = criterion(outputs, targets)
    reference = DFineLoss(hf_config(DFineConfig, up=up, reg_scale=reg_scale))
    theirs = reference(*to_transformers(outputs, targets))
    assert {"loss_fgl_aux_0", "loss_ddf_aux_1", "loss_fgl_dn_2", "loss_ddf_dn_0"} <= set(theirs)
    compare(ours, theirs)
    # transformers leaves out the last layer's FGL (the original D-FINE has it): its loss_local on
    # the top-level set with the same matching
    hf_outputs, hf_targets = to_transformers(outputs, targets, top_level_corners=True)
    hf_outputs["teacher_corners"] = hf_outputs["pred_corners"]   # the last layer is the teacher
    top = reference.loss_local(hf_outputs, hf_targets, reference.matcher(hf_outputs, hf_targets),
                               float(max(sum(counts), 1)))
    assert top["loss_ddf"].item() == 0.0 and "loss_ddf" not in ours   # nothing to distil at the top
    assert ours["loss_fgl"].item() == pytest.approx(0.15 * top["loss_fgl"].item(), rel=1e-5)
    assert ours["loss_ddf_dn_2"].item() == 0.0   # the teacher layer distils nothing from itself


def test_deim_mal_with_union_matching_equals_transformers():
    targets = make_targets([4, 0, 7], seed=5)
    outputs = make_outputs(targets, dfine=True, seed=6)
    ours = SetCriterion(num_classes=NUM_CLASSES, class_loss="mal", gamma=1.5, union_matching=True,
                        per_layer_keys=True)(outputs, targets)
    config = hf_config(Deimv2Config, focal_loss_gamma=1.5, mal_alpha=None, use_dense_one_to_one=True)
    theirs = Deimv2Loss(config)(*to_transformers(outputs, targets))
    assert "loss_mal_aux_0" in theirs and "loss_vfl" not in ours
    compare(ours, theirs)


def test_union_takes_the_most_frequent_target_per_query():
    t = torch.tensor
    first = [(t([0, 2]), t([1, 0])), (t([], dtype=torch.int64), t([], dtype=torch.int64))]
    second = [(t([0, 3]), t([1, 0])), (t([], dtype=torch.int64), t([], dtype=torch.int64))]
    third = [(t([0, 2]), t([0, 1])), (t([], dtype=torch.int64), t([], dtype=torch.int64))]
    (q, j), (q_empty, _) = union_of_matches([first, second, third])
    # query 0 -> target 1 twice, target 0 once; query 2 -> 0 and 1 once each (tie: the lower index)
    assert q.tolist() == [0, 2, 3] and j.tolist() == [1, 0, 0] and q_empty.numel() == 0


@pytest.mark.parametrize("dfine", [False, True])
def test_empty_targets_give_finite_losses_and_zero_box_terms(dfine):
    targets = make_targets([0, 0])
    outputs = make_outputs(targets, dfine=dfine, denoising=False)
    outputs["dn_outputs"], outputs["dn_meta"] = [outputs["aux_outputs"][0]], {
        "dn_positive_idx": [torch.zeros(0, dtype=torch.int64)] * 2, "dn_num_group": GROUPS,
        "dn_num_split": [0, QUERIES]}
    losses = SetCriterion(num_classes=NUM_CLASSES, union_matching=dfine)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    for key, value in losses.items():
        if key.startswith(("loss_bbox", "loss_giou", "loss_fgl")):
            assert value.item() == 0.0, key
    assert losses["loss_vfl"].item() > 0 and losses["loss_vfl_dn"].item() > 0
    if dfine:
        assert losses["loss_ddf_aux"].item() > 0   # unmatched queries are still distilled


def test_varifocal_loss_by_hand_on_two_queries():
    """Query 0 matched to class 1 with IoU 0.5; query 1 unmatched; alpha 0.75, gamma 2."""
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]])
    matched = (torch.tensor([0]), torch.tensor([0]))
    sig = lambda x: 1 / (1 + math.exp(-x))   # noqa: E731
    negative = lambda x: 0.75 * sig(x) ** 2 * -math.log(1 - sig(x))   # noqa: E731
    positive = 0.5 * -(0.5 * math.log(sig(-1.0)) + 0.5 * math.log(1 - sig(-1.0)))
    expected = negative(0.5) + positive + negative(2.0) + negative(0.0)
    loss = varifocal_loss(logits, matched, torch.tensor([1]), torch.tensor([0.5]), 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # through the criterion: the matched box has IoU 0.5 with its target, normalised by one box
    target = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.1]])}]
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    losses = SetCriterion(num_classes=2)(outputs, target)
    assert losses["loss_vfl"].item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_equals_transformers_formula():
    targets = make_targets([3, 2])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, QUERIES, NUM_CLASSES, generator=g) * 2
    matched = (torch.tensor([0, 0, 0, 1, 1]), torch.tensor([4, 1, 7, 0, 9]))
    labels = torch.cat([t["labels"] for t in targets])
    one_hot = torch.zeros_like(logits)
    one_hot[matched[0], matched[1], labels] = 1
    expected = hf_sigmoid_focal_loss(logits, one_hot, 5.0, alpha=0.25, gamma=2.0) * QUERIES
    assert torch.allclose(focal_loss(logits, matched, labels, 5.0), expected, rtol=1e-6)


def test_gradients_reach_every_output_set():
    targets = make_targets([3, 1])
    outputs = make_outputs(targets, dfine=True)
    leaves = [outputs["pred_logits"], outputs["pred_corners"], outputs["aux_outputs"][0]["pred_boxes"],
              outputs["aux_outputs"][1]["pred_corners"], outputs["enc_aux_outputs"][0]["pred_logits"],
              outputs["dn_outputs"][0]["pred_boxes"], outputs["dn_outputs"][1]["pred_corners"]]
    for leaf in leaves:
        leaf.requires_grad_(True)
    sum(SetCriterion(num_classes=NUM_CLASSES)(outputs, targets).values()).backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="class_loss"):
        SetCriterion(num_classes=3, class_loss="ce")
    with pytest.raises(ValueError, match="unknown term"):
        SetCriterion(num_classes=3, weights={"vfll": 1.0})
    assert SetCriterion(num_classes=3, weights={"vfl": 0.5, "giou": 1.0}).weights == {
        "class": 0.5, "bbox": 5.0, "giou": 1.0, "fgl": 0.15, "ddf": 1.5}


@pytest.mark.parametrize("kind,criterion", [
    ("RTDETRHead", {"type": "SetCriterion"}),
    ("DFINEHead", {"type": "SetCriterion", "union_matching": True, "class_loss": "mal", "gamma": 1.5}),
])
def test_real_head_outputs_train_with_the_criterion(kind, criterion):
    """The heads' own raw-output dict (denoising, encoder, D-FINE's pre-bbox head and corners) with
    an empty and a crowded image: finite losses, every set gets a gradient, and AdamW lowers it."""
    from detkit.models import HEADS
    from detkit.structures import ShapeSpec

    shapes = {"p3": ShapeSpec(16, 8), "p4": ShapeSpec(16, 16), "p5": ShapeSpec(16, 32)}
    torch.manual_seed(0)
    head = HEADS.build({"type": kind, "hidden_dim": 32, "num_queries": 10, "num_decoder_layers": 2,
                        "num_heads": 4, "ffn_dim": 32, "num_denoising": 8, "criterion": criterion},
                       "model.head", input_shapes=shapes, num_classes=3).train()
    g = torch.Generator().manual_seed(0)
    features = {n: torch.randn(2, 16, 64 // s.stride, 96 // s.stride, generator=g) for n, s in shapes.items()}
    targets = [{"boxes": torch.tensor([[8.0, 16.0, 40.0, 56.0], [50.0, 4.0, 90.0, 30.0], [60, 30, 80, 60]]),
                "labels": torch.tensor([2, 0, 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    totals = []
    for step in range(30):
        outputs = head(features, targets)
        losses = head.loss(outputs, targets, [(64, 96)] * 2)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        if step == 0:
            suffixes = {k.split("_", 2)[-1] if k.count("_") > 1 else "" for k in losses}
            assert {"aux", "enc", "dn"} <= suffixes and (kind == "RTDETRHead" or "pre" in suffixes)
            assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
        optimizer.step()
        totals.append(total.item())
    assert sum(totals[-5:]) < 0.85 * sum(totals[:5]), totals   # denoising noise varies per step


def test_box_count_is_averaged_over_ranks(monkeypatch):
    """Under DDP every term is divided by the mean box count of the ranks (a stand-in for a second
    rank holding 5 boxes), so a rank with few boxes does not inflate its loss."""
    import detkit.models.detr.criterion as module

    def all_reduce(value):
        value += 5.0   # the other rank's count
    monkeypatch.setattr(module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(module.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(module.dist, "get_world_size", lambda: 2)
    assert module.average_count(1, torch.device("cpu")) == 3.0
    assert module.average_count(0, torch.device("cpu")) == 2.5
    targets = make_targets([1])
    outputs = make_outputs(targets, denoising=False)
    distributed = SetCriterion(num_classes=NUM_CLASSES)(outputs, targets)
    monkeypatch.setattr(module.dist, "is_initialized", lambda: False)
    alone = SetCriterion(num_classes=NUM_CLASSES)(outputs, targets)
    assert torch.allclose(distributed["loss_giou"] * 3.0, alone["loss_giou"])
