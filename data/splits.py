"""Splits that the pipelines take batches from: `len`, `gather(idx)`, `spec`, `meta`.

`gather` is vectorised (one fancy-indexing op per key), so a batch costs no Python loop per example.
Image splits also have `read(idx)` -> (uint8 images, labels) and `pixel_max`, the input of the
per-image preprocessing of data.augment; encoded ones (`EncodedImageSplit`) have only that.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Sequence

import numpy as np
from PIL import Image

from data.errors import DataError


def window_range(split_rows: range, seq_len: int, pred_len: int, lookback_from_previous_split: bool,
                 split: str = "") -> tuple[int, int]:
  """(row where window 0 starts, number of windows) of the windows whose targets lie in `split_rows`.

  A window is `seq_len` input rows followed by `pred_len` target rows. With a lookback from the previous
  split (the official borders `[b - seq_len, e)`), inputs may start before the split, never before row 0;
  otherwise (PEMS) the split is windowed on its own. Count = rows (with lookback) - seq_len - pred_len + 1.
  """
  if seq_len < 1 or pred_len < 1:
    raise DataError(f"seq_len and pred_len must be positive, got {seq_len} and {pred_len}")
  first_input_row = 0 if lookback_from_previous_split else split_rows.start
  first_target_row = max(split_rows.start, first_input_row + seq_len)
  num_windows = split_rows.stop - pred_len - first_target_row + 1
  if num_windows < 1:
    raise DataError(f"split {split!r} has {len(split_rows)} rows, too few for seq_len={seq_len} + "
                    f"pred_len={pred_len}")
  return first_target_row - seq_len, num_windows


def checked_indices(idx, size: int) -> np.ndarray:
  """idx as a 1-D int64 array, refused if it is not integer or out of [0, size) (numpy would wrap)."""
  idx = np.asarray(idx)
  if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
    raise IndexError(f"gather expects a 1-D integer index array, got {idx.dtype} {idx.shape}")
  if idx.size and (idx.min() < 0 or idx.max() >= size):
    raise IndexError(f"gather index out of range [0, {size}): min {idx.min()}, max {idx.max()}")
  return idx.astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class ForecastingSplit:
  """Windows over one in-memory series; window i starts at row `first_row + i`."""
  values: np.ndarray          # [rows, n_vars] float32, the whole series (scaled)
  marks: np.ndarray | None    # [rows, n_marks] float32 time features, None without time marks
  first_row: int
  num_windows: int
  seq_len: int
  pred_len: int
  meta: dict[str, Any]
  dates: np.ndarray | None = None   # [rows] datetime64[s] of the series' rows (to label forecasts)

  def __len__(self) -> int:
    return self.num_windows

  def gather(self, idx) -> dict[str, np.ndarray]:
    starts = self.first_row + checked_indices(idx, len(self))
    input_rows = starts[:, None] + np.arange(self.seq_len)
    target_rows = starts[:, None] + self.seq_len + np.arange(self.pred_len)
    batch = {"x": self.values[input_rows], "y": self.values[target_rows]}
    if self.marks is not None:
      batch["x_mark"] = self.marks[input_rows]
    return batch

  @property
  def spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    n_vars = self.values.shape[1]
    spec = {"x": ((self.seq_len, n_vars), np.dtype(np.float32)),
            "y": ((self.pred_len, n_vars), np.dtype(np.float32))}
    if self.marks is not None:
      spec["x_mark"] = ((self.seq_len, self.marks.shape[1]), np.dtype(np.float32))
    return spec


@dataclasses.dataclass(frozen=True, eq=False)
class TokenSplit:
  """Packed token sequences of a language-model corpus (data/text.py), held in memory.

  A batch: `tokens` int32 [k, L + 1] (inputs `[:, :-1]`, targets `[:, 1:]`), `weights` float32
  [k, L] (1 where the target is a real token, 0 in the padding of a split's last sequence) and
  `num_bytes` float32 [k]: the text bytes those targets stand for (targets x the split's bytes per
  token), the denominator of bits per byte.
  """
  tokens: np.ndarray       # [n, L + 1] int32
  num_tokens: np.ndarray   # [n] int32, real tokens of each sequence
  meta: dict[str, Any]

  def __len__(self) -> int:
    return len(self.tokens)

  def gather(self, idx) -> dict[str, np.ndarray]:
    idx = checked_indices(idx, len(self))
    targets = np.arange(1, self.tokens.shape[1])
    weights = (targets[None, :] < self.num_tokens[idx, None]).astype(np.float32)
    return {"tokens": self.tokens[idx], "weights": weights,
            "num_bytes": (weights.sum(1) * self.meta["bytes_per_token"]).astype(np.float32)}

  @property
  def spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    length = self.tokens.shape[1] - 1
    return {"tokens": ((length + 1,), np.dtype(np.int32)),
            "weights": ((length,), np.dtype(np.float32)), "num_bytes": ((), np.dtype(np.float32))}


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationSplit:
  """Images held in memory as one array (small datasets: Fashion-MNIST, digits)."""
  images: np.ndarray   # [n, H, W, C] uint8
  labels: np.ndarray   # [n] int
  pixel_max: int       # images are served as float32 pixel / pixel_max, in [0, 1]
  meta: dict[str, Any]

  def __len__(self) -> int:
    return len(self.labels)

  def gather(self, idx) -> dict[str, np.ndarray]:
    """The stored pixels / pixel_max, vectorised (no augmentation: see data.augment for that)."""
    idx = checked_indices(idx, len(self))
    return {"image": self.images[idx].astype(np.float32) / np.float32(self.pixel_max),
            "label": self.labels[idx].astype(np.int32)}

  def read(self, idx) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [k, H, W, C], int32 labels [k]): what data.augment preprocesses."""
    idx = checked_indices(idx, len(self))
    return self.images[idx], self.labels[idx].astype(np.int32)

  @property
  def spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {"image": (self.images.shape[1:], np.dtype(np.float32)), "label": ((), np.dtype(np.int32))}


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedImageSplit:
  """Images kept encoded (JPEG/PNG bytes) in a random-access source and decoded when read.

  For datasets too large for memory (ImageNet) or of images of different sizes (image folders):
  batches always go through data.augment, which crops them to one size.
  """
  source: Sequence[dict[str, Any]]   # record i -> {'image': encoded bytes, 'label': int, ...}
  meta: dict[str, Any]
  pixel_max: int = 255

  def __len__(self) -> int:
    return len(self.source)

  def read(self, idx) -> tuple[list[np.ndarray], np.ndarray]:
    """(decoded uint8 RGB images [H_i, W_i, 3], int32 labels [k])."""
    idx = checked_indices(idx, len(self))
    records = self.source.__getitems__(idx.tolist())
    return ([decode_image(r["image"], r.get("file_name", "")) for r in records],
            np.array([r["label"] for r in records], np.int32))


def decode_image(encoded: bytes, name: str = "") -> np.ndarray:
  """JPEG/PNG bytes -> uint8 RGB [H, W, 3] (grey, CMYK and palette images converted, as TFDS)."""
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"cannot decode image {name or '(unnamed)'}: {e}") from e
