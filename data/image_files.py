"""Readers of raw image trees and archives, for the builders of encoded-image datasets.

- An image folder: `ROOT/train/<class>/*.{jpg,jpeg,png}`, optionally `ROOT/val/` (or `validation/`)
  and `ROOT/test/` with the same class folders; classes are the sorted subfolder names of train/.
- ImageNet (ILSVRC2012) as TFDS documents its manual download: `ILSVRC2012_img_train.tar` (one tar
  per class, `<wnid>.tar`, inside) and `ILSVRC2012_img_val.tar` (flat), or the same extracted:
  `train/<wnid>/*.JPEG` and `val/` (flat, or in `<wnid>/` folders). Class order and the validation
  labels are the ones tensorflow-datasets ships (`datasets/imagenet2012/labels.txt` and
  `validation_labels.txt`), so label i means what it means in TFDS's `imagenet2012`.

Examples are (key, record) pairs with the file's bytes as they are (`image`), `label` and
`file_name`; nothing is decoded or re-encoded here (TFDS's own builders need TensorFlow for that).
Each image's header is parsed on the way, so a file that is no image is refused while preparing,
not in training.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import pathlib
import re
import tarfile
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VALIDATION_FOLDERS = ("val", "validation")
IMAGENET_TRAIN_TAR, IMAGENET_VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
_IMAGENET_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.")
Example = tuple[str, dict]


def checked_image(data: bytes, name: str) -> bytes:
  """`data` if PIL recognises it as an image (header only), else a DataError naming the file."""
  try:
    with Image.open(io.BytesIO(data)):
      return data
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"{name} is not a readable image ({e})") from e


def _record(data: bytes, label: int, name: str) -> dict:
  return {"image": checked_image(data, name), "label": label, "file_name": name}


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _files_of_class_folders(root: pathlib.Path, split_dir: pathlib.Path, class_index: dict[str, int]
                            ) -> list[tuple[str, int]]:
  """(path relative to root, label) of every image in split_dir/<class>/, classes sorted."""
  unknown = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and d.name not in class_index)
  if unknown:
    raise DataError(f"{split_dir} has class folders that train/ lacks: {unknown[:5]}")
  return [(str(path.relative_to(root)), class_index[d.name])
          for d in sorted(split_dir.iterdir()) if d.is_dir() for path in _image_files(d)]


# ----------------------------------------------------------------------------- image folder

@dataclasses.dataclass(frozen=True)
class ImageFolderTree:
  root: pathlib.Path
  class_names: tuple[str, ...]
  splits: dict[str, list[tuple[str, int]]]   # split -> (file relative to root, label), in order


def read_image_folder(root: str, validation_fraction: float = 0.0) -> ImageFolderTree:
  """Lists a class-per-subfolder tree; validation is val/ (or validation/) or a share of train/.

  With `validation_fraction` f > 0 (and no validation folder), the images of train/ in sorted order
  are permuted with `numpy.random.default_rng(0)`; the first int(f * n) become validation.
  """
  root_path = pathlib.Path(root).expanduser()
  train_dir = root_path / "train"
  if not train_dir.is_dir():
    raise DataError(f"image folder {root_path} has no train/ folder: expected "
                    f"{root_path}/train/<class>/*.jpg|png (and optionally val/ and test/ with the "
                    "same class folders)")
  class_names = tuple(sorted(d.name for d in train_dir.iterdir() if d.is_dir()))
  if not class_names:
    raise DataError(f"{train_dir} has no class folders: expected {train_dir}/<class>/*.jpg|png")
  class_index = {name: i for i, name in enumerate(class_names)}
  splits = {"train": _files_of_class_folders(root_path, train_dir, class_index)}
  empty = [name for name in class_names if not _image_files(train_dir / name)]
  if empty:
    raise DataError(f"class folders without .jpg/.jpeg/.png images in {train_dir}: {empty[:5]}")
  validation_dirs = [root_path / name for name in VALIDATION_FOLDERS if (root_path / name).is_dir()]
  if len(validation_dirs) > 1:
    raise DataError(f"{root_path} has both val/ and validation/; keep one")
  if validation_dirs and validation_fraction:
    raise DataError(f"{root_path} has a validation folder; validation_fraction="
                    f"{validation_fraction} would make a second one. Set it to 0 or remove the "
                    "folder.")
  if validation_dirs:
    splits["validation"] = _files_of_class_folders(root_path, validation_dirs[0], class_index)
  elif validation_fraction:
    splits["train"], splits["validation"] = _split_off(splits["train"], validation_fraction,
                                                       train_dir)
  if (root_path / "test").is_dir():
    splits["test"] = _files_of_class_folders(root_path, root_path / "test", class_index)
  return ImageFolderTree(root_path, class_names, splits)


def _split_off(files: list, fraction: float, train_dir: pathlib.Path) -> tuple[list, list]:
  num_validation = int(fraction * len(files))
  if not 0 < fraction < 1 or not 0 < num_validation < len(files):
    raise DataError(f"validation_fraction={fraction} of the {len(files)} images in {train_dir} "
                    "leaves an empty split; use a fraction in (0, 1) that gives both an image")
  order = np.random.default_rng(0).permutation(len(files))
  validation, train = sorted(order[:num_validation]), sorted(order[num_validation:])
  return [files[i] for i in train], [files[i] for i in validation]


def image_folder_examples(tree: ImageFolderTree, split: str) -> Iterator[Example]:
  for relative, label in tree.splits[split]:
    yield relative, _record((tree.root / relative).read_bytes(), label, relative)


# ----------------------------------------------------------------------------- ImageNet

def _tfds_imagenet_file(name: str) -> tuple[str, ...]:
  return tuple(tfds.core.tfds_path(f"datasets/imagenet2012/{name}").read_text().split())


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
  """The 1000 WordNet ids in TFDS's label order (sorted)."""
  return _tfds_imagenet_file("labels.txt")


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
  """The 1000 classes' names in label order, WordNet's synonyms ("tench, Tinca tinca"; timm's
  ImageNetInfo descriptions)."""
  lines = (pathlib.Path(__file__).parent / "imagenet_class_names.txt").read_text().splitlines()
  return tuple(line.split("\t", 1)[1] for line in lines)


@functools.cache
def _imagenet_validation_wnids() -> tuple[str, ...]:
  """WordNet id of ILSVRC2012_val_{i+1:08d}.JPEG at index i (TFDS's validation_labels.txt)."""
  return _tfds_imagenet_file("validation_labels.txt")


def imagenet_sources(manual_dir: str) -> dict[str, pathlib.Path]:
  """split -> the tar or extracted folder to read it from; a DataError says what is missing."""
  if not manual_dir:
    raise DataError("dataset 'imagenet2012' is prepared from your copy of ILSVRC2012: pass "
                    f"--manual_dir DIR (config: data.manual_dir) holding {IMAGENET_TRAIN_TAR} and "
                    f"{IMAGENET_VAL_TAR} (or their extracted folders train/ and val/)")
  folder = pathlib.Path(manual_dir).expanduser()
  sources = {}
  for split, tar_name, dir_name in (("train", IMAGENET_TRAIN_TAR, "train"),
                                    ("validation", IMAGENET_VAL_TAR, "val")):
    if (folder / tar_name).is_file():
      sources[split] = folder / tar_name
    elif (folder / dir_name).is_dir():
      sources[split] = folder / dir_name
    else:
      raise DataError(f"{tar_name} not found: neither {folder / tar_name} nor an extracted folder "
                      f"{folder / dir_name}/. Get ILSVRC2012 from https://image-net.org "
                      f"(registration) and put the tars in {folder}.")
  return sources


@functools.cache
def _imagenet_class_index() -> dict[str, int]:
  return {name: i for i, name in enumerate(imagenet_wnids())}


def _class_label(wnid: str, where: str) -> int:
  labels = _imagenet_class_index()
  if wnid not in labels:
    raise DataError(f"{where}: {wnid!r} is not one of the 1000 ILSVRC2012 classes (WordNet ids "
                    "like n01440764)")
  return labels[wnid]


def _validation_label(name: str) -> int:
  match = _IMAGENET_VAL_NAME.search(name)
  wnids = _imagenet_validation_wnids()
  if not match or not 1 <= int(match.group(1)) <= len(wnids):
    raise DataError(f"{name}: expected a validation image named "
                    f"ILSVRC2012_val_<8 digits, 1..{len(wnids)}>.JPEG")
  return _class_label(wnids[int(match.group(1)) - 1], name)


def imagenet_examples(source: pathlib.Path, split: str) -> Iterator[Example]:
  """The images of one split from its tar or folder (see the module docstring)."""
  if source.is_dir():
    class_dirs = sorted(d for d in source.iterdir() if d.is_dir())
    if split == "train" or class_dirs:   # train/<wnid>/ or val/<wnid>/ (a common re-arrangement)
      for class_dir in class_dirs:
        label = _class_label(class_dir.name, str(class_dir))
        for path in _image_files(class_dir):
          yield path.name, _record(path.read_bytes(), label, path.name)
    else:
      for path in _image_files(source):
        yield path.name, _record(path.read_bytes(), _validation_label(path.name), path.name)
    return
  try:
    with tarfile.open(source, mode="r|") as archive:
      for member in archive:
        if not member.isfile():
          continue
        name, data = pathlib.PurePosixPath(member.name).name, archive.extractfile(member).read()
        if split == "validation":
          yield name, _record(data, _validation_label(name), name)
        elif name.endswith(".tar"):
          label = _class_label(name[:-len(".tar")], f"{source}: {name}")
          yield from _class_tar_examples(data, label)
  except tarfile.TarError as e:
    raise DataError(f"{source} is not a readable tar archive ({e})") from e


def _class_tar_examples(data: bytes, label: int) -> Iterator[Example]:
  with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
    for member in archive:
      if member.isfile():
        name = pathlib.PurePosixPath(member.name).name
        yield name, _record(archive.extractfile(member).read(), label, name)
