"""Object-aware cropping: MSER proposals, the dilated region, and views cut from it."""

import cv2
import numpy as np
import pytest
import torch

from detkit.data import build_dataloader, build_dataset
from detkit.registry import ConfigError
from detkit.ssl.regions import ProposalCrops, region_proposals


def scene(seed: int = 0, size: int = 96) -> np.ndarray:
    """A noisy low-contrast background with one filled square at x 50..70, y 20..40 (RGB)."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(110, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    cv2.rectangle(image, (50, 20), (69, 39), (230, 40, 40), thickness=-1)
    return image


def test_proposals_find_the_square_on_a_noisy_background():
    boxes = region_proposals(scene())
    assert len(boxes) >= 1
    best = boxes[np.argmin(np.abs(boxes - [50, 20, 70, 40]).sum(axis=1))]
    np.testing.assert_allclose(best, [50, 20, 70, 40], atol=2)
    # a flat image has nothing to propose; a box under min_size is dropped
    assert len(region_proposals(np.full((64, 64, 3), 90, np.uint8))) == 0
    large = region_proposals(scene(), min_size=25)
    assert ((large[:, 2:] - large[:, :2]) >= 25).all()


def test_region_is_the_dilated_square_proposal_clipped_to_the_image():
    crops = ProposalCrops(dilate=[2.0, 2.0])
    image = scene()
    for seed in range(5):
        x1, y1, x2, y2 = crops.region(image, np.random.default_rng(seed))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        proposals = region_proposals(image)
        # twice the longer side of some proposal, centred on it (the square is far from the border)
        sides = 2 * np.maximum(proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1])
        centres = (proposals[:, :2] + proposals[:, 2:]) / 2
        match = (np.abs(centres - [cx, cy]).max(axis=1) <= 1) & (np.abs(sides - (x2 - x1)) <= 1)
        assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96 and match.any()
    assert ProposalCrops(p=0.0).region(image, np.random.default_rng(0)) is None
    assert ProposalCrops().region(np.full((64, 64, 3), 90, np.uint8), np.random.default_rng(0)) is None


def _split(root, crops):
    views = [{"count": 2, "size": 32, "scale": [0.5, 1.0], "transforms": []}]
    return {"dataset": {"type": "MultiViewDataset", "source": {"type": "ImageFolder", "img_dir": "."},
                        "views": views, "proposal_crops": crops},
            "batch_size": 2, "num_workers": 0, "drop_last": True}


def test_views_come_from_the_proposal_region_and_are_seeded(tmp_path):
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.png"), cv2.cvtColor(scene(i), cv2.COLOR_RGB2BGR))
    cfg = _split(tmp_path, {"p": 1.0, "dilate": [1.2, 1.5]})
    dataset = build_dataset(cfg, root=str(tmp_path))
    dataset.set_seed(0)
    views, _ = dataset[0]
    # with the region at most 1.5 x the square, at least about a quarter of every view is the red
    # square, against (20 / 96)^2 = 4% of a view cut from the whole image
    red = ((views[:, 0] > 0.8) & (views[:, 1] < 0.3)).float().mean(dim=(1, 2))
    assert (red > 0.2).all(), red
    loader = build_dataloader(cfg, dataset, train=True, seed=3)
    first, again = next(iter(loader))[0], next(iter(loader))[0]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("crops, match", [
    ({"p": 2.0}, "0 <= p <= 1"), ({"dilate": [0.5, 2.0]}, "1 <= min <= max"),
    ({"min_sise": 4}, "min_sise"), ("yes", "expected a mapping")])
def test_bad_proposal_crops_name_the_key(tmp_path, crops, match):
    cv2.imwrite(str(tmp_path / "0.png"), scene())
    with pytest.raises(ConfigError, match=match):
        build_dataset(_split(tmp_path, crops), root=str(tmp_path), path="data.train")
