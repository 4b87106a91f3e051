"""How the official iTransformer loaders (`data_provider/data_loader.py`) cut a series into splits.

A protocol says which rows are the *targets* of each split and whether a split's windows may take their
lookback from the rows before it (the official borders `[b - seq_len, e)`). Windowing itself is the same
for every protocol (`data.splits.window_range`).
"""
import dataclasses
from typing import Callable

from data.errors import DataError

SPLITS = ("train", "validation", "test")
# Rows that are no split's targets but lie between splits (Solar's val = int(0.1 n) can leave a gap of a
# row or two before the test split); they are stored because the next split's lookback reads them.
LOOKBACK_ROWS = "lookback"


@dataclasses.dataclass(frozen=True)
class Protocol:
  name: str
  split_rows: Callable[[int], dict[str, range]]   # number of rows in the file -> split -> target rows
  lookback_from_previous_split: bool
  has_dates: bool
  file_format: str = "dated_csv"   # dated_csv | headerless_csv (Solar) | npz (PEMS)
  fill_nans: bool = False   # PEMS: pandas ffill then bfill within each split, after scaling


def _ett_rows(rows_per_month: int) -> Callable[[int], dict[str, range]]:
  """Dataset_ETT_hour/minute: 12/4/4 months of 30 days; rows after 20 months are never used."""
  def split_rows(num_rows: int) -> dict[str, range]:
    del num_rows  # the borders are fixed; the file's row count is validated when it is read
    train_end, val_end, test_end = (12 * rows_per_month, 16 * rows_per_month, 20 * rows_per_month)
    return {"train": range(0, train_end), "validation": range(train_end, val_end),
            "test": range(val_end, test_end)}
  return split_rows


def _custom_rows(num_rows: int) -> dict[str, range]:
  """Dataset_Custom: train int(0.7 n), test int(0.2 n), validation the rest."""
  num_train, num_test = int(num_rows * 0.7), int(num_rows * 0.2)
  return {"train": range(0, num_train), "validation": range(num_train, num_rows - num_test),
          "test": range(num_rows - num_test, num_rows)}


def _solar_rows(num_rows: int) -> dict[str, range]:
  """Dataset_Solar: like custom, but validation is int(0.1 n) rows, so rows may stay unassigned."""
  num_train, num_test, num_val = int(num_rows * 0.7), int(num_rows * 0.2), int(num_rows * 0.1)
  return {"train": range(0, num_train), "validation": range(num_train, num_train + num_val),
          "test": range(num_rows - num_test, num_rows)}


def _pems_rows(num_rows: int) -> dict[str, range]:
  """Dataset_PEMS: 60/20/20."""
  train_end, val_end = int(num_rows * 0.6), int(num_rows * 0.8)
  return {"train": range(0, train_end), "validation": range(train_end, val_end),
          "test": range(val_end, num_rows)}


ETT_HOUR = Protocol("ETT_hour", _ett_rows(30 * 24), lookback_from_previous_split=True, has_dates=True)
ETT_MINUTE = Protocol("ETT_minute", _ett_rows(30 * 24 * 4), lookback_from_previous_split=True,
                      has_dates=True)
CUSTOM = Protocol("custom", _custom_rows, lookback_from_previous_split=True, has_dates=True)
SOLAR = Protocol("Solar", _solar_rows, lookback_from_previous_split=True, has_dates=False,
                 file_format="headerless_csv")
PEMS = Protocol("PEMS", _pems_rows, lookback_from_previous_split=False, has_dates=False,
                file_format="npz", fill_nans=True)


def stored_rows(protocol: Protocol, num_rows: int) -> dict[str, range | list[int]]:
  """The rows to store per TFDS split: the three target splits, plus rows in gaps between them."""
  splits = protocol.split_rows(num_rows)
  empty = [split for split, rows in splits.items() if not rows]
  if empty:
    raise DataError(f"{num_rows} rows are too few for the {protocol.name} protocol: split(s) {empty} "
                    "would be empty")
  last_row = max(rows.stop for rows in splits.values())
  assigned = set().union(*splits.values())
  gaps = [row for row in range(last_row) if row not in assigned]
  return {**splits, LOOKBACK_ROWS: gaps} if gaps else splits
