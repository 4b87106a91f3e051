"""A prepared `zoo_series` dataset -> `ForecastingSplit`, as iTransformer's data loaders build it.

The whole series (every stored split, ordered by row) is read into memory once per process; a split's
windows are those whose targets lie in it. Scaling is sklearn's StandardScaler fitted on the train rows
only (float64), applied to every row, then cast to float32 as the official loop does.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import sklearn.preprocessing
import tensorflow_datasets as tfds

from data import protocols
from data.catalog import SeriesDataset
from data.errors import DataError
from data.splits import ForecastingSplit, window_range
from data.timefeatures import time_features


@dataclasses.dataclass(frozen=True)
class StoredSeries:
  values: np.ndarray             # [rows, n_vars] float64, as in the raw file
  dates: np.ndarray | None       # [rows] datetime64[s]
  split_rows: dict[str, range]   # target rows of train / validation / test
  columns: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SeriesOptions:
  seq_len: int
  pred_len: int
  freq: str = "h"
  time_marks: bool = True
  scale: bool = True


def load_split(dataset_dir: str, dataset: SeriesDataset, split: str, options: SeriesOptions) -> ForecastingSplit:
  if split not in protocols.SPLITS:
    raise DataError(f"unknown split {split!r} of {dataset.name!r}; expected one of {protocols.SPLITS}")
  values, marks, meta = _model_inputs(dataset_dir, dataset, options.freq, options.time_marks, options.scale)
  stored = read_stored_series(dataset_dir)
  first_row, num_windows = window_range(stored.split_rows[split], options.seq_len, options.pred_len,
                                        dataset.protocol.lookback_from_previous_split, split)
  return ForecastingSplit(values, marks, first_row, num_windows, options.seq_len, options.pred_len,
                          dict(meta), stored.dates)


@functools.lru_cache(maxsize=8)
def read_stored_series(dataset_dir: str) -> StoredSeries:
  """Every record of every split, ordered by row (cached: the other splits reuse it)."""
  builder = tfds.builder_from_directory(dataset_dir)
  rows, values, dates, split_rows = [], [], [], {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    records = source.__getitems__(range(len(source)))
    split_row_numbers = [r["row"] for r in records]
    rows += split_row_numbers
    values += [r["values"] for r in records]
    dates += [r["date"].decode() for r in records if "date" in r]
    if split in protocols.SPLITS:
      split_rows[split] = range(split_row_numbers[0], split_row_numbers[-1] + 1)
  order = np.argsort(rows)
  if not np.array_equal(np.asarray(rows)[order], np.arange(len(rows))):
    raise DataError(f"{dataset_dir}: the stored rows are not one contiguous series; prepare it again")
  return StoredSeries(values=_read_only(np.stack(values)[order]),
                      dates=_read_only(np.array(dates, "datetime64[s]")[order]) if dates else None,
                      split_rows=split_rows, columns=tuple(builder.info.metadata["columns"]))


@functools.lru_cache(maxsize=16)
def _model_inputs(dataset_dir: str, dataset: SeriesDataset, freq: str, time_marks: bool, scale: bool):
  """(values [rows, n_vars] f32, marks [rows, n_marks] f32 | None, meta) shared by the three splits."""
  stored = read_stored_series(dataset_dir)
  if time_marks and stored.dates is None:
    raise DataError(f"dataset {dataset.name!r} has no timestamps: set time_marks=False "
                    "(the official runs use no time marks for Solar and PEMS)")
  train = stored.split_rows["train"]
  mean, std = fit_standard_scaler(stored.values[train.start:train.stop], scale)
  values = (stored.values - mean) / std
  if dataset.protocol.fill_nans:
    values = np.concatenate([fill_nans(values[rows.start:rows.stop]) for rows in _segments(stored)])
  marks = time_features(stored.dates, freq).astype(np.float32) if time_marks else None
  meta = {"n_vars": values.shape[1], "n_marks": 0 if marks is None else marks.shape[1],
          "mean": mean, "std": std, "columns": stored.columns}
  return _read_only(values.astype(np.float32)), marks if marks is None else _read_only(marks), meta


def _read_only(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False   # shared by every split of the process (cached)
  return array


def fit_standard_scaler(train_values: np.ndarray, scale: bool) -> tuple[np.ndarray, np.ndarray]:
  """Mean and scale of sklearn's StandardScaler (ddof 0, NaNs ignored); identity when scale=False."""
  if not scale:
    n_vars = train_values.shape[1]
    return np.zeros(n_vars), np.ones(n_vars)
  scaler = sklearn.preprocessing.StandardScaler().fit(train_values)
  return scaler.mean_, scaler.scale_


def _segments(stored: StoredSeries) -> list[range]:
  """The series cut at every split border (in row order); they cover every row."""
  borders = sorted({0, len(stored.values), *(r.start for r in stored.split_rows.values()),
                    *(r.stop for r in stored.split_rows.values())})
  return [range(a, b) for a, b in zip(borders[:-1], borders[1:])]


def fill_nans(values: np.ndarray) -> np.ndarray:
  """pandas `ffill()` then `bfill()` along rows, per column (what Dataset_PEMS does to each split)."""
  def forward_fill(v):
    rows = np.where(np.isnan(v), 0, np.arange(len(v))[:, None])
    return np.take_along_axis(v, np.maximum.accumulate(rows, axis=0), axis=0)
  return forward_fill(forward_fill(values)[::-1])[::-1]
