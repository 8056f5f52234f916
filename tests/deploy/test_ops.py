"""The exportable building blocks against torchvision's reference operators."""

import pytest
import torch
from torchvision.ops import batched_nms, ps_roi_align

from detkit.deploy.ops import INVALID_SCORE, grouped_nms, top_per_image
from detkit.deploy.two_stage import rfcn_vote


def _rois(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 120
    wh = torch.rand(n, 2, generator=g) * 80
    rois = torch.cat([torch.randint(0, 2, (n, 1), generator=g).float(), xy, xy + wh], 1)
    rois[0, 1:] = torch.tensor([4.0, 4.0, 4.0, 4.0])          # degenerate: forced to 1 x 1
    rois[1, 1:] = torch.tensor([12.0, 4.0, 20.0, 150.0])      # past the bottom of the map
    return rois


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_rfcn_vote_equals_ps_roi_align(sampling_ratio):
    maps = torch.randn(2, 9 * 5, 16, 20, generator=torch.Generator().manual_seed(1))
    # (adaptive sampling of the zero-size RoI 0 divides 0 by 0 in torchvision: NaN; RPN
    # proposals are never empty, so it is left out there)
    rois = _rois(300)[(1 if sampling_ratio == 0 else 0):]
    ref = ps_roi_align(maps, rois, 3, 1 / 8, sampling_ratio).mean((2, 3))
    torch.testing.assert_close(rfcn_vote(maps, rois, 3, 1 / 8, sampling_ratio), ref, atol=2e-6, rtol=0)


def test_grouped_nms_equals_batched_nms_per_class():
    g = torch.Generator().manual_seed(4)
    xy = torch.rand(2, 60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(2, 60, 2, generator=g) * 30], -1)
    scores = torch.rand(2, 60, generator=g)
    labels = torch.randint(0, 3, (2, 60), generator=g)
    columns = torch.where(labels[:, None] == torch.arange(3)[None, :, None], scores[:, None],
                          torch.full((2, 3, 60), INVALID_SCORE))
    kept = grouped_nms(boxes, columns, 0.5)
    for b in range(2):
        ref = batched_nms(boxes[b], scores[b], labels[b], 0.5)
        assert set(kept[kept[:, 0] == b, 2].tolist()) == set(ref.tolist())
        assert torch.equal(kept[kept[:, 0] == b, 1], labels[b][kept[kept[:, 0] == b, 2]])


def test_top_per_image_ranks_and_pads():
    image = torch.tensor([1, 0, 1, 1, 0])
    scores = torch.tensor([0.2, 0.9, 0.7, 0.4, 0.1])
    index, valid = top_per_image(image, scores, 3, 2)
    assert index.tolist() == [[1, 4], [2, 3], [5, 5]]       # 5 = the padding row
    assert valid.tolist() == [[True, True], [True, True], [False, False]]
