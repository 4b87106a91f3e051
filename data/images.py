"""A prepared image-classification dataset -> `ClassificationSplit` (pixels in memory:
Fashion-MNIST, digits) or `EncodedImageSplit` (image files read on demand: ImageNet, folders)."""
from __future__ import annotations

import functools

import numpy as np
import tensorflow_datasets as tfds

from data.catalog import ImageDataset
from data.errors import DataError
from data.splits import ClassificationSplit, EncodedImageSplit


def load_split(dataset_dir: str, dataset: ImageDataset,
               split: str) -> ClassificationSplit | EncodedImageSplit:
  if dataset.encoded:
    builder = _builder(dataset_dir, split)
    label_feature = builder.info.features["label"]
    meta = {"num_classes": label_feature.num_classes, "image_shape": (None, None, 3),
            "class_names": tuple(label_feature.names)}
    return EncodedImageSplit(builder.as_data_source(split), meta, dataset.pixel_max)
  images, labels, num_classes, class_names = _read_split(dataset_dir, split)
  meta = {"num_classes": num_classes, "image_shape": images.shape[1:], "class_names": class_names}
  return ClassificationSplit(images, labels, dataset.pixel_max, meta)


def _builder(dataset_dir: str, split: str) -> tfds.core.DatasetBuilder:
  builder = tfds.builder_from_directory(dataset_dir)
  if split not in builder.info.splits:
    raise DataError(f"{builder.info.name} has no split {split!r}; it has {list(builder.info.splits)}")
  return builder


@functools.lru_cache(maxsize=8)
def _read_split(dataset_dir: str, split: str):
  """Every record of a split, in memory (cached per process)."""
  builder = _builder(dataset_dir, split)
  source = builder.as_data_source(split)
  records = source.__getitems__(range(len(source)))
  label_feature = builder.info.features["label"]
  return (np.stack([r["image"] for r in records]), np.array([r["label"] for r in records], np.int64),
          label_feature.num_classes, tuple(label_feature.names))
