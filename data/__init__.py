"""Datasets of the zoo: TFDS builders for local raw files (no TensorFlow needed) and grain pipelines.

  python -m data.prepare ett_h1 --manual_dir ~/data/ETT-small     # once: raw CSV -> TFDS ArrayRecord

  split = data.load(config.data, "train")          # ForecastingSplit | ClassificationSplit
  len(split); split.gather(np.arange(32)); split.spec; split.meta
  data.train_batches(split, batch_size, seed, input_config=config.input)   # element e = step e
  data.eval_batches(split, batch_size, input_config=config.input)   # each example once, + 'mask'

Image splits are augmented (training) or resized and center-cropped (evaluation) as config.input
says: see data/augment.py. Dataset names: `data.DATASETS`, and 'custom' for any CSV of the
iTransformer custom protocol, 'image_folder' for any class-per-subfolder tree of JPEG/PNG images.
"""
from data.catalog import CUSTOM, DATASETS, IMAGE_FOLDER
from data.errors import DataError
from data.loading import load
from data.pipeline import eval_batches, steps_per_epoch, train_batches
from data.splits import ClassificationSplit, EncodedImageSplit, ForecastingSplit

__all__ = ["CUSTOM", "DATASETS", "IMAGE_FOLDER", "ClassificationSplit", "DataError",
           "EncodedImageSplit", "ForecastingSplit", "eval_batches", "load", "steps_per_epoch",
           "train_batches"]
