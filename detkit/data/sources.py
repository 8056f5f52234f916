"""``--data PATH``: your own data in a shipped config, the format and the splits found from the path.

:func:`find_data_source` reads what a path is (no image is opened):

* an Ultralytics ``data.yaml`` (or a folder holding one): ``YoloDetection`` on its splits;
* a COCO folder: ``annotations/instances_<split>.json`` (or ``annotations/<split>.json``, or
  Roboflow's ``<split>/_annotations.coco.json``) with the images in ``<split>/``,
  ``images/<split>/`` or next to the json; a single ``.json`` file: that file with ``images/``;
* a YOLO folder without ``data.yaml``: ``images/<split>/`` + ``labels/<split>/`` (or
  ``<split>/images`` + ``<split>/labels``) and the class names in ``classes.txt``;
* a VOC folder: ``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt`` (or a
  VOCdevkit holding ``VOC2007/``, ``VOC2012/`` ...); class names from ``classes.txt`` or the
  sorted object names of the xml files.

Splits: ``train`` (else ``trainval``) trains; ``val`` (else ``valid``, else ``test``) evaluates;
with no such split the training images are evaluated, with a note. :func:`apply_data_source`
puts the found datasets into the config's splits (keeping its pipelines, loaders and dataset
wrappers such as ``Mosaic``) and unsets ``model.num_classes``, which
:func:`detkit.data.classes.resolve_num_classes` then takes from the data.
"""

from __future__ import annotations

import copy
import inspect
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_config, load_yaml
from ..errors import DatasetError, note_once
from ..registry import DATASETS
from .classes import DETECTOR_TYPES

__all__ = ["DataSource", "find_data_source", "apply_data_source", "load_training_config"]

TRAIN_SPLITS = ("train", "trainval")
VAL_SPLITS = ("val", "valid", "validation", "test")
_WRAPPERS = ("Mosaic",)   # dataset nodes that wrap one ``dataset`` and are kept around the new one
# Options of the replaced dataset node that carry over to the new one where its type has them.
_KEPT_OPTIONS = ("filter_empty", "instance_masks", "with_masks", "skip_bad_images", "keep_difficult")


@dataclass
class DataSource:
    """What a ``--data`` path holds: its format and one dataset config node per split."""

    format: str                  # "yolo", "coco" or "voc"
    root: Path
    splits: dict[str, dict] = field(default_factory=dict)   # "train" / "val" -> dataset node

    def describe(self) -> str:
        return f"{self.format} data in {self.root} (splits: {', '.join(self.splits)})"


def find_data_source(path: str | Path) -> DataSource:
    """The format and the train / val dataset nodes of ``path`` (see the module docstring)."""
    path = Path(path).expanduser().resolve()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return _yolo_yaml(path)
    if path.is_file() and path.suffix == ".json":
        images = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
        node = {"type": "CocoDetection", "img_dir": str(images), "ann_file": str(path)}
        return _pick_splits("coco", path.parent, {"train": node})
    if not path.is_dir():
        raise DatasetError(f"--data: {path} is neither a folder nor a data.yaml / COCO .json file")
    for finder in (_yaml_in_folder, _voc_folder, _coco_folder, _yolo_folder):
        found = finder(path)
        if found is not None:
            return found
    raise DatasetError(
        f"--data: cannot tell the format of {path}: expected a data.yaml (YOLO), annotations/*.json "
        f"(COCO), images/<split> + labels/<split> + classes.txt (YOLO) or Annotations + JPEGImages + "
        f"ImageSets/Main (VOC); see data/README.md")


def _pick_splits(fmt: str, root: Path, found: dict[str, dict]) -> DataSource:
    """``found`` (split name -> node) reduced to ``train`` and ``val``."""
    train = next((found[s] for s in TRAIN_SPLITS if s in found), None)
    val = next((found[s] for s in VAL_SPLITS if s in found), None)
    if train is None:
        raise DatasetError(f"--data {root}: no training split (looked for {', '.join(TRAIN_SPLITS)}; "
                           f"found {', '.join(found) or 'none'})")
    if val is None:
        note_once(f"--data {root}: no val split ({', '.join(VAL_SPLITS)}): evaluating on the training "
                  f"images, which measures fit, not generalisation")
        val = train
    return DataSource(fmt, root, {"train": train, "val": copy.deepcopy(val)})


def _yolo_yaml(path: Path) -> DataSource:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except Exception as e:   # noqa: BLE001 - any YAML problem is the user's file: one line
        raise DatasetError(f"--data {path}: not a readable YAML file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DatasetError(f"--data {path}: a YOLO data.yaml needs 'names' and the split folders")
    found = {s: {"type": "YoloDetection", "data_yaml": str(path), "split": s}
             for s in (*TRAIN_SPLITS, *VAL_SPLITS) if data.get(s)}
    return _pick_splits("yolo", path.parent, found)


def _yaml_in_folder(folder: Path) -> DataSource | None:
    candidates = [folder / "data.yaml", folder / "data.yml"]
    candidates += [p for p in sorted(folder.glob("*.y*ml")) if p not in candidates]
    for candidate in candidates:
        if candidate.is_file() and re.search(r"^names\s*:", candidate.read_text(errors="replace"), re.M):
            return _yolo_yaml(candidate)
    return None


def _split_of(name: str) -> str | None:
    """``instances_train2017`` -> ``train``, ``valid`` -> ``valid``, ``test-dev2017`` -> ``test``."""
    tokens = re.split(r"[^a-z]+", name.lower())
    return next((s for s in (*TRAIN_SPLITS, *VAL_SPLITS) if s in tokens), None)


def _coco_folder(folder: Path) -> DataSource | None:
    jsons = sorted((folder / "annotations").glob("*.json")) + sorted(folder.glob("*.json"))
    jsons += sorted(folder.glob("*/_annotations.coco.json"))      # Roboflow's COCO export
    if any(p.name.startswith("instances_") for p in jsons):       # COCO ships captions_ / keypoints too
        jsons = [p for p in jsons if p.name.startswith("instances_") or p.name == "_annotations.coco.json"]
    found: dict[str, dict] = {}
    for ann in jsons:
        stem = ann.parent.name if ann.name == "_annotations.coco.json" else ann.stem
        split = _split_of(stem)
        if split is None or split in found:
            continue
        tag = stem.removeprefix("instances_")      # train2017
        dirs = [ann.parent] if ann.name == "_annotations.coco.json" else [
            folder / tag, folder / "images" / tag, folder / split, folder / "images" / split,
            folder / "images"]
        img_dir = next((d for d in dirs if d.is_dir()), None)
        if img_dir is None:
            raise DatasetError(f"--data {folder}: found {ann} but no image folder for it (looked for "
                               f"{', '.join(str(d.relative_to(folder)) for d in dirs)})")
        found[split] = {"type": "CocoDetection", "img_dir": str(img_dir), "ann_file": str(ann)}
    return _pick_splits("coco", folder, found) if found else None


def _read_names(folder: Path) -> list[str] | None:
    for name in ("classes.txt", "names.txt", "labels.txt"):
        if (folder / name).is_file():
            lines = (folder / name).read_text(encoding="utf-8").splitlines()
            return [ln.strip() for ln in lines if ln.strip()]
    return None


def _yolo_folder(folder: Path) -> DataSource | None:
    pairs = {}
    for split in (*TRAIN_SPLITS, *VAL_SPLITS):
        for images, labels in ((folder / "images" / split, folder / "labels" / split),
                               (folder / split / "images", folder / split / "labels")):
            if images.is_dir() and labels.is_dir():
                pairs[split] = (images, labels)
                break
    if not pairs:
        return None
    names = _read_names(folder)
    if names is None:
        raise DatasetError(f"--data {folder}: YOLO folders found ({', '.join(pairs)}) but no class names: "
                           f"write them one per line into {folder / 'classes.txt'}, or use a data.yaml")
    found = {s: {"type": "YoloDetection", "img_dir": str(i), "label_dir": str(lab), "class_names": names}
             for s, (i, lab) in pairs.items()}
    return _pick_splits("yolo", folder, found)


def _is_voc(folder: Path) -> bool:
    return (folder / "Annotations").is_dir() and (folder / "ImageSets" / "Main").is_dir()


def _voc_folder(folder: Path) -> DataSource | None:
    bases = [folder] if _is_voc(folder) else [d for d in sorted(folder.glob("VOC*")) if _is_voc(d)]
    if not bases:
        return None
    names = _read_names(folder) or _read_names(bases[0]) or _voc_object_names(bases)
    found: dict[str, dict] = {}
    for split in (*TRAIN_SPLITS, *VAL_SPLITS):
        nodes = [{"type": "VOCDetection", "root": str(b), "year": None, "split": split, "class_names": names}
                 for b in bases if (b / "ImageSets" / "Main" / f"{split}.txt").is_file()]
        if nodes:
            found[split] = nodes[0] if len(nodes) == 1 or split in VAL_SPLITS else \
                {"type": "ConcatDataset", "datasets": nodes}
    return _pick_splits("voc", folder, found)


def _voc_object_names(bases: list[Path]) -> list[str]:
    """Sorted ``<object><name>`` values of every xml (the 20 VOC classes are alphabetical too)."""
    names: set[str] = set()
    for base in bases:
        for xml_file in (base / "Annotations").glob("*.xml"):
            try:
                objects = ET.parse(xml_file).getroot().iter("object")
                names.update((o.findtext("name") or "").strip() for o in objects)
            except ET.ParseError as e:
                raise DatasetError(f"{xml_file}: malformed XML ({e})") from None
    names.discard("")
    if not names:
        raise DatasetError(f"--data: no <object> in the xml files of {bases[0] / 'Annotations'}")
    return sorted(names)


def load_training_config(path, overrides=(), *, data: str | Path | None = None) -> dict:
    """``load_config`` for training: ``--data`` applied before the ``--set`` overrides, then
    ``model.num_classes`` taken from (or checked against) the data."""
    from .classes import resolve_num_classes

    hook = (lambda cfg: apply_data_source(cfg, data)) if data is not None else None
    return resolve_num_classes(load_config(path, overrides, before_overrides=hook))


def apply_data_source(cfg: dict, data: str | Path) -> dict:
    """``cfg`` (a copy) training and evaluating on ``data``: each split's dataset node (inside
    its wrappers) replaced by the found one, ``data.root`` the data folder, ``model.num_classes``
    unset (taken from the data later), an ``evaluation.ann_file`` of the old data dropped."""
    source = find_data_source(data)
    cfg = copy.deepcopy(cfg)
    splits = cfg.setdefault("data", {})
    splits["root"] = str(source.root)
    for split, node in source.splits.items():
        if not isinstance(splits.get(split), dict):
            if split == "val":
                continue   # the config trains without evaluation: keep it so
            splits[split] = {}
        holder, key = _innermost(splits[split])
        previous = holder.get(key)
        holder[key] = _with_kept_options(node, previous if isinstance(previous, dict) else {})
    model = cfg.get("model")
    if isinstance(model, dict) and model.get("type") in DETECTOR_TYPES:
        model["num_classes"] = None
    if isinstance(cfg.get("evaluation"), dict):
        cfg["evaluation"].pop("ann_file", None)
    note_once(f"--data: {source.describe()}")
    return cfg


def _with_kept_options(node: dict, old: dict) -> dict:
    """``node`` with the options of the replaced dataset node that its type accepts too
    (``filter_empty`` for training, Mask R-CNN's ``instance_masks``, ``skip_bad_images`` ...)."""
    if node["type"] == "ConcatDataset":
        return {**node, "datasets": [_with_kept_options(n, old) for n in node["datasets"]]}
    accepted = inspect.signature(DATASETS.get(node["type"])).parameters
    kept = {k: v for k, v in old.items() if k in _KEPT_OPTIONS and k in accepted}
    return {**node, **kept}


def _innermost(split: dict) -> tuple[dict, str]:
    """The mapping and key holding the split's leaf dataset node (inside Mosaic-like wrappers)."""
    holder: dict = split
    while True:
        inner = holder.get("dataset")
        if not (isinstance(inner, dict) and inner.get("type") in _WRAPPERS
                and isinstance(inner.get("dataset"), dict)):
            return holder, "dataset"
        holder = inner
