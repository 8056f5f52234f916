"""Semantic masks with sparse values (0, 7, 26; 255 ignore): classes from a mapping or a file,
contiguous training labels, predicted PNGs written back in the dataset's values and scored by
``tools/eval.py --seg-gt``; the legend on the overlays."""

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detkit.data import SemanticSegDataset
from detkit.data.seg_classes import labels_to_values, read_seg_classes
from detkit.errors import DatasetError
from detkit.registry import ConfigError
from detkit.seg_output import SegOutputWriter, draw_seg_legend
from detkit.visualize import class_color

ROOT = Path(__file__).resolve().parents[2]
VALUES, NAMES = [0, 7, 26], ["background", "road", "car"]
SIZES = {"a": (40, 56), "b": (48, 44), "c": (36, 36)}


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_sparse_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sparse(tmp_path):
    """Images whose colour follows the mask (road grey, car red), masks 0 / 7 / 26 / 255."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for stem, (h, w) in SIZES.items():
        mask = np.zeros((h, w), np.uint8)
        mask[h // 2:] = 7
        x = int(rng.integers(4, w // 2))
        mask[h // 4: h // 4 + 12, x: x + 14] = 26
        mask[0, :] = 255                                     # an ignored border row
        image = np.where(mask[..., None] == 26, [0, 0, 220], np.where(mask[..., None] == 7, 128, 30))
        image = np.clip(image + rng.integers(-10, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "images" / f"{stem}.jpg"), image)
        cv2.imwrite(str(tmp_path / "masks" / f"{stem}.png"), mask)
    return tmp_path


def test_classes_from_mapping_and_files(tmp_path):
    expected = (VALUES, NAMES)
    assert read_seg_classes({26: "car", 0: "background", "7": "road"}) == expected
    (tmp_path / "data.yaml").write_text("path: .\nclasses: {0: background, 7: road, 26: car}\n")
    assert read_seg_classes("data.yaml", root=tmp_path) == expected
    (tmp_path / "classes.txt").write_text("26 car\n0 background\n\n7 road\n")
    assert read_seg_classes(tmp_path / "classes.txt") == expected
    (tmp_path / "names.txt").write_text("background\nroad\ncar\n")
    assert read_seg_classes(tmp_path / "names.txt") == ([0, 1, 2], NAMES)
    # COCO panoptic's categories json (a list) and an annotation json holding "categories".
    cats = [{"id": 26, "name": "car", "isthing": 1}, {"id": 7, "name": "road", "isthing": 0},
            {"id": 0, "name": "background", "isthing": 0}]
    (tmp_path / "panoptic_categories.json").write_text(json.dumps(cats))
    (tmp_path / "panoptic_val.json").write_text(json.dumps({"annotations": [], "categories": cats}))
    assert read_seg_classes(tmp_path / "panoptic_categories.json") == expected
    assert read_seg_classes(str(tmp_path / "panoptic_val.json")) == expected


@pytest.mark.parametrize("classes, message", [
    ({0: "a", 300: "b"}, r"mask value 300 .*outside 0\.\.255"),
    ({"x": "a"}, r"mask value 'x' .*not an integer"),
    ({}, "no classes"),
    ("missing.yaml", r"classes file not found: .*missing\.yaml"),
])
def test_bad_classes_are_one_error(tmp_path, classes, message):
    with pytest.raises(DatasetError, match=message):
        read_seg_classes(classes, root=tmp_path)
    (tmp_path / "dup.txt").write_text("7 road\n7 street\n")
    with pytest.raises(DatasetError, match=r"dup\.txt: mask value 7 is listed twice"):
        read_seg_classes(tmp_path / "dup.txt")


def test_dataset_maps_values_to_contiguous_labels(sparse):
    ds = SemanticSegDataset("images", "masks", root=str(sparse), classes={0: "background", 7: "road",
                                                                          26: "car", 99: "unused"})
    assert ds.class_names == [*NAMES, "unused"] and ds.label_to_cat_id == [*VALUES, 99]
    for i, stem in enumerate(sorted(SIZES)):
        mask = cv2.imread(str(sparse / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        reference = np.full(mask.shape, 255, np.int64)        # unlisted values: ignored
        for label, value in enumerate([*VALUES, 99]):
            reference[mask == value] = label
        assert torch.equal(ds[i][1]["sem_seg"], torch.from_numpy(reference))
    with pytest.raises(ConfigError, match="not both"):
        SemanticSegDataset("images", "masks", NAMES, root=str(sparse), classes={0: "background"})
    with pytest.raises(DatasetError, match=r"ignore value 255 \('void'\)"):
        SemanticSegDataset("images", "masks", root=str(sparse), classes={0: "bg", 255: "void"})


def test_labels_to_values_and_legend():
    labels = torch.tensor([[0, 1, 2], [2, 2, 1]])
    assert labels_to_values(labels, VALUES).tolist() == [[0, 7, 26], [26, 26, 7]]
    with pytest.raises(ValueError, match="3 mask values"):
        labels_to_values(torch.tensor([[3]]), VALUES)
    # CocoDetection with_masks: names without background, label 0 is background.
    writer = SegOutputWriter(class_names=["cat"], label_to_cat_id=[17], num_labels=2)
    assert writer.label_names == ["background", "cat"] and writer.values is None
    assert writer.to_png_values(torch.tensor([[0, 1]])).tolist() == [[0, 1]]

    image = np.full((120, 160, 3), 200, np.uint8)
    sem_seg = np.zeros((120, 160), np.int64)
    sem_seg[60:, :] = 1                                       # road: the largest area, listed first
    sem_seg[10:30, 100:130] = 2
    out = draw_seg_legend(image, sem_seg, NAMES, skip_labels=(0,))
    assert (out[-1, -1] == 200).all() and (image == 200).all()   # picture kept, input untouched
    # Two rows: the swatch of each row is its class colour, road above car; no background row.
    swatches = [tuple(int(c) for c in out[y, 6]) for y in range(120)
                if out[y, 6].tolist() != out[y, 0].tolist()]
    colours = list(dict.fromkeys(swatches))
    assert colours == [class_color(1), class_color(2)]
    assert out[:40, :40].mean() < 200 * 0.6                  # the dark panel
    assert (draw_seg_legend(image, np.zeros((120, 160), np.int64), NAMES, skip_labels=(0,)) == image).all()


def test_train_infer_eval_round_trip(sparse, tmp_path):
    """Segmentor trained 3 iterations on the sparse masks -> tools/infer.py writes PNGs in
    0 / 7 / 26 -> tools/eval.py --seg-gt scores them as tools/eval.py scores the checkpoint on
    the same images; the dataset's own labels written back score mIoU 1.0."""
    from detkit.config import load_config
    from detkit.engine.trainer import train

    node = {"_delete_": True, "type": "SemanticSegDataset", "img_dir": "images", "mask_dir": "masks",
            "classes": {0: "background", 7: "road", 26: "car"}}
    overrides = [f"data.root={sparse}", f"data.train.dataset={json.dumps(node)}",
                 f"data.val.dataset={json.dumps(node)}", "data.train.num_workers=0",
                 "data.val.num_workers=0", "data.train.batch_size=3", "data.val.batch_size=3",
                 "model.num_classes=3"]
    config = ROOT / "configs" / "segmentation" / "seg_r18_shapes.yaml"
    cfg = load_config(config, [*overrides, "train.max_iters=3", "train.eval_interval=0",
                               "train.log_interval=1", "train.scheduler.warmup_iters=1",
                               "train.checkpoint.interval=3"])
    work = tmp_path / "work"
    train(cfg, work)
    checkpoint = work / "last.pth"
    assert torch.load(checkpoint, weights_only=False)["meta"]["label_to_cat_id"] == VALUES
    infer, evaluate = _tool("infer"), _tool("eval")
    out = tmp_path / "infer"
    assert infer.main([str(checkpoint), str(sparse / "images"), "--out", str(out)]) == 0
    predicted_values = set()
    for stem, (h, w) in SIZES.items():
        predicted = cv2.imread(str(out / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert predicted.shape == (h, w) and set(np.unique(predicted)) <= set(VALUES)
        predicted_values |= set(np.unique(predicted).tolist())
        assert cv2.imread(str(out / f"{stem}.jpg")).shape == (h, w, 3)
    assert predicted_values - {0}            # not only background: label 1 was written as 7
    model_json, files_json = tmp_path / "model.json", tmp_path / "files.json"
    assert evaluate.main([str(config), str(checkpoint), "--device", "cpu", "--out", str(model_json),
                          "--set", *overrides]) == 0
    assert evaluate.main(["--seg-gt", str(sparse / "masks"), "--seg-pred", str(out / "masks"),
                          "--num-classes", "27", "--out", str(files_json)]) == 0
    model_metrics, file_metrics = json.loads(model_json.read_text()), json.loads(files_json.read_text())
    for key in ("sem_seg/PA", "sem_seg/mIoU"):
        assert file_metrics[key] == pytest.approx(model_metrics[key], abs=1e-9), key

    # A perfect prediction: the dataset's own contiguous labels (ignored pixels as background).
    (sparse / "classes.txt").write_text("0 background\n7 road\n26 car\n")
    ds = SemanticSegDataset("images", "masks", root=str(sparse), classes="classes.txt")
    writer = SegOutputWriter(class_names=ds.class_names, label_to_cat_id=ds.label_to_cat_id, num_labels=3)
    perfect = tmp_path / "perfect"
    for i, stem in enumerate(sorted(SIZES)):
        labels = ds[i][1]["sem_seg"].clone()
        labels[labels == 255] = 0
        writer.write_png(perfect / f"{stem}.png", labels)
    perfect_json = tmp_path / "perfect.json"
    assert evaluate.main(["--seg-gt", str(sparse / "masks"), "--seg-pred", str(perfect),
                          "--num-classes", "27", "--out", str(perfect_json)]) == 0
    scores = json.loads(perfect_json.read_text())
    assert scores["sem_seg/mIoU"] == 1.0 and scores["sem_seg/PA"] == 1.0
    assert scores["sem_seg/IoU-26"] == 1.0 and scores["sem_seg/IoU-7"] == 1.0


def test_segmentor_num_classes_from_the_classes(sparse):
    from detkit.data.classes import resolve_num_classes

    (sparse / "classes.yaml").write_text("classes: {0: background, 7: road, 26: car}\n")

    def config(num_classes, classes="classes.yaml"):
        node = {"type": "SemanticSegDataset", "img_dir": "images", "mask_dir": "masks", "classes": classes}
        return {"model": {"type": "Segmentor", "num_classes": num_classes},
                "data": {"root": str(sparse), "train": {"dataset": node}, "val": {"dataset": dict(node)}}}

    assert resolve_num_classes(config(None))["model"]["num_classes"] == 3
    assert resolve_num_classes(config(3))["model"]["num_classes"] == 3
    with pytest.raises(ConfigError, match=r"num_classes is 2 but the data has 3 classes \(background, road, "
                                          r"car\) in data\.val \(SemanticSegDataset\.classes\.yaml\)"):
        resolve_num_classes(config(2))
    voc = config(None)
    for split in ("train", "val"):
        del voc["data"][split]["dataset"]["classes"]
    assert resolve_num_classes(voc)["model"]["num_classes"] == 21     # background + the VOC classes
    assert resolve_num_classes(config(5), check=False)["model"]["num_classes"] == 5   # tools/eval.py


def test_any_classes_file_reads_or_is_one_error(tmp_path):
    """Random text / YAML / JSON as a classes file: values and names, or DatasetError."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalar = st.one_of(st.integers(-3, 300), st.text(max_size=4), st.none(), st.booleans(), st.floats())
    doc = st.one_of(st.dictionaries(scalar, scalar, max_size=4), st.lists(scalar, max_size=4),
                    st.lists(st.fixed_dictionaries({"id": scalar}, optional={"name": scalar}), max_size=3),
                    st.dictionaries(st.sampled_from(["classes", "names", "categories"]),
                                    st.dictionaries(scalar, scalar, max_size=3), max_size=1), scalar)

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(doc=doc, suffix=st.sampled_from([".yaml", ".json", ".txt"]), raw=st.text(max_size=30))
    def check(doc, suffix, raw):
        path = tmp_path / f"classes{suffix}"
        text = {".json": json.dumps(doc, default=str), ".yaml": json.dumps(doc, default=str), ".txt": raw}
        path.write_text(text[suffix] if suffix != ".yaml" or len(raw) % 2 else raw)   # yaml: both kinds
        for source in (path, doc):
            try:
                values, names = read_seg_classes(source)
            except DatasetError as e:
                assert "\n" not in str(e)
                continue
            assert values == sorted(set(values)) and all(0 <= v <= 255 for v in values)
            assert len(names) == len(values) and all(isinstance(n, str) for n in names)

    check()
