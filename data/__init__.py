"""Datasets of the zoo: TFDS builders for local raw files (no TensorFlow needed) and grain pipelines.

  python -m data.prepare ett_h1 --manual_dir ~/data/ETT-small     # once: raw CSV -> TFDS ArrayRecord

  split = data.load(config.data, "train")          # ForecastingSplit | ClassificationSplit
  len(split); split.gather(np.arange(32)); split.spec; split.meta
  data.train_batches(split, batch_size, seed)      # grain.MapDataset: element e = batch of step e
  data.eval_batches(split, batch_size)             # every example once, padded last batch + 'mask'

Dataset names: `data.DATASETS` (and 'custom' for any CSV of the iTransformer custom protocol).
"""
from data.catalog import CUSTOM, DATASETS
from data.errors import DataError
from data.loading import load
from data.pipeline import eval_batches, steps_per_epoch, train_batches
from data.splits import ClassificationSplit, ForecastingSplit

__all__ = ["CUSTOM", "DATASETS", "ClassificationSplit", "DataError", "ForecastingSplit", "eval_batches",
           "load", "steps_per_epoch", "train_batches"]
