"""ImageList padding and the mapping of boxes back to original pixels."""

import torch

from detkit.structures import ImageList, boxes_to_original


def test_image_list_pads_to_divisibility_and_keeps_content():
    a = torch.rand(3, 30, 41)
    b = torch.rand(3, 50, 20)
    batch = ImageList.from_tensors([a, b], size_divisibility=32)
    assert batch.tensor.shape == (2, 3, 64, 64)
    assert batch.image_sizes == [(30, 41), (50, 20)]
    assert torch.equal(batch.tensor[0, :, :30, :41], a)
    assert torch.equal(batch.tensor[1, :, :50, :20], b)
    assert batch.tensor[0, :, 30:].abs().sum() == 0 and batch.tensor[1, :, :, 20:].abs().sum() == 0
    single = ImageList.from_tensors([a], size_divisibility=0)
    assert single.tensor.shape == (1, 3, 30, 41)


def test_boxes_to_original_inverts_letterbox():
    orig = torch.tensor([[10.0, 20.0, 110.0, 60.0], [0.0, 0.0, 200.0, 100.0]])
    scale, offset = torch.tensor([0.5, 0.5]), torch.tensor([0.0, 25.0])  # 200x100 -> 100x50 + pad 25
    transformed = orig * scale.repeat(2) + offset.repeat(2)
    meta = {"scale": scale, "offset": offset, "orig_size": torch.tensor([100, 200])}
    assert torch.allclose(boxes_to_original(transformed, meta), orig)
    # boxes spilling past the image are clipped to the original size (H0=100, W0=200)
    spill = torch.tensor([[-5.0, 20.0, 120.0, 90.0]])
    assert torch.allclose(boxes_to_original(spill, meta), torch.tensor([[0.0, 0.0, 200.0, 100.0]]))


def test_boxes_to_original_without_scale_is_identity():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(boxes_to_original(boxes, {}), boxes)


def test_boxes_to_original_undoes_a_flip():
    # a horizontal flip of a 100-px-wide image is x' = -x + 100: scale -1, offset 100
    meta = {"scale": torch.tensor([-1.0, 1.0]), "offset": torch.tensor([100.0, 0.0])}
    flipped = torch.tensor([[70.0, 5.0, 90.0, 25.0]])  # original box 10..30
    assert torch.equal(boxes_to_original(flipped, meta), torch.tensor([[10.0, 5.0, 30.0, 25.0]]))


def test_dense_to_original_crops_letterbox_and_resizes():
    from detkit.structures import dense_to_original
    # original 4x6 labels, letterboxed x2 into 16x12 ... scale 2, offset (0, 2): rows 2..10 hold it
    orig = torch.arange(24).view(4, 6)
    up = orig.repeat_interleave(2, 0).repeat_interleave(2, 1)           # 8 x 12
    canvas = torch.full((12, 12), 255, dtype=torch.int64)
    canvas[2:10] = up
    meta = {"orig_size": torch.tensor([4, 6]), "scale": torch.tensor([2.0, 2.0]),
            "offset": torch.tensor([0.0, 2.0])}
    assert torch.equal(dense_to_original(canvas, meta), orig)
    logits = canvas[None].float()
    back = dense_to_original(logits, meta, mode="bilinear")
    assert back.shape == (1, 4, 6) and back.dtype == torch.float32
