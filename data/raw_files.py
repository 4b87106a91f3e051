"""Readers of the raw files that the builders prepare.

Each reader parses and validates; anything unexpected raises `DataError` naming the file, and where it
applies the line and column at fault, before TFDS writes a single record.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import pathlib
import re

import numpy as np

from data.catalog import ImageDataset, SeriesDataset, TextDataset
from data.errors import DataError

DATE_COLUMN, TARGET_COLUMN = "date", "OT"
# "2016-07-01 00:00:00" (ETT, weather), "1990/1/1 0:00" (exchange_rate), "2002-01-01" (dates only).
_DATE = re.compile(r"(\d{4})[-/](\d{1,2})[-/](\d{1,2})(?:[ T](\d{1,2}):(\d{2})(?::(\d{2}))?)?")


@dataclasses.dataclass(frozen=True)
class RawSeries:
  columns: tuple[str, ...]   # value columns in the order the model sees them (target `OT` last)
  values: np.ndarray         # [rows, vars] float64
  dates: np.ndarray | None   # [rows] datetime64[s]; None for files without timestamps


def raw_file(manual_dir: str, file: str, dataset_name: str, source: str) -> pathlib.Path:
  """The path of a raw file in manual_dir, or a DataError that says where to get it."""
  if not manual_dir:
    raise DataError(f"dataset {dataset_name!r} is prepared from {file}: pass --manual_dir DIR "
                    f"(config: data.manual_dir), the folder that holds it. Get it from {source}.")
  path = pathlib.Path(manual_dir).expanduser() / file
  if not path.is_file():
    raise DataError(f"{file} not found: no file {path}. Dataset {dataset_name!r} needs it; "
                    f"get it from {source} and put it in {pathlib.Path(manual_dir).expanduser()}.")
  return path


def read_series(dataset: SeriesDataset, manual_dir: str) -> RawSeries:
  path = raw_file(manual_dir, dataset.file, dataset.name, dataset.source)
  read = {"dated_csv": read_dated_csv, "headerless_csv": read_headerless_csv,
          "npz": read_pems_npz}[dataset.protocol.file_format]
  series = read(path, dataset)
  if dataset.num_rows is not None and len(series.values) != dataset.num_rows:
    raise DataError(f"{path}: {len(series.values)} data rows, but the published {dataset.file} has "
                    f"{dataset.num_rows}; the file looks truncated or is another version. Get it again "
                    f"from {dataset.source} (or prepare another version as dataset 'custom').")
  return series


def read_dated_csv(path: pathlib.Path, dataset: SeriesDataset) -> RawSeries:
  """A CSV with a header, a `date` column and the target `OT`, read like `Dataset_Custom`."""
  header, lines, cells = _read_csv(path, has_header=True)
  _check_header(path, header, dataset)
  others = [c for c in header if c not in (DATE_COLUMN, TARGET_COLUMN)]
  order = [header.index(c) for c in (*others, TARGET_COLUMN)]   # official: [date, *others, target]
  columns = tuple(header[i] for i in order)
  values = _parse_numbers(path, cells[:, order], columns, lines)
  dates = parse_dates(path, cells[:, header.index(DATE_COLUMN)], lines)
  return RawSeries(columns, values, dates)


def read_headerless_csv(path: pathlib.Path, dataset: SeriesDataset) -> RawSeries:
  """Comma-separated numbers without header or dates (`Dataset_Solar`'s solar_AL.txt)."""
  del dataset
  _, lines, cells = _read_csv(path, has_header=False)
  columns = tuple(str(i) for i in range(cells.shape[1]))
  return RawSeries(columns, _parse_numbers(path, cells, columns, lines), None)


def read_pems_npz(path: pathlib.Path, dataset: SeriesDataset) -> RawSeries:
  """`np.load(file)['data'][:, :, 0]` (traffic flow) like `Dataset_PEMS`; NaNs are kept (filled on load)."""
  del dataset
  data = _npz_array(path, "data")
  if data.ndim != 3 or data.shape[2] < 1 or not np.issubdtype(data.dtype, np.number):
    raise DataError(f"{path}: 'data' must be a numeric array [time, nodes, features], "
                    f"got {data.dtype} {data.shape}")
  values = data[:, :, 0].astype(np.float64)
  if np.isinf(values).any():
    row, col = np.argwhere(np.isinf(values))[0]
    raise DataError(f"{path}: infinite value at time step {row}, node {col}")
  return RawSeries(tuple(str(i) for i in range(values.shape[1])), values, None)


def _npz_array(path: pathlib.Path, name: str) -> np.ndarray:
  try:
    loaded = np.load(path, allow_pickle=False)
  except (OSError, EOFError, ValueError) as e:
    raise DataError(f"{path} is not a readable .npz file ({e})") from e
  if not isinstance(loaded, np.lib.npyio.NpzFile) or name not in loaded.files:
    raise DataError(f"{path}: expected a PEMS .npz holding an array {name!r} [time, nodes, features]")
  with loaded:
    try:
      return loaded[name]
    except ValueError as e:   # pickled objects: never unpickle a downloaded file
      raise DataError(f"{path}: array {name!r} is not plain numbers ({e})") from e


def parse_dates(path: pathlib.Path, texts: np.ndarray, lines: list[int]) -> np.ndarray:
  """Date strings -> datetime64[s]; the formats of the published files (no pandas needed)."""
  try:   # ISO dates (ETT, weather, illness), vectorised
    dates = np.array(np.char.strip(texts), "datetime64[s]")
    if not np.isnat(dates).any():   # numpy reads '' and 'NaT' as NaT
      return dates
  except ValueError:
    pass
  dates = np.empty(len(texts), "datetime64[s]")   # other formats, and locating the bad date
  for i, text in enumerate(texts):
    try:
      dates[i] = np.datetime64(_iso_date(text))
    except ValueError:   # no match, or no such day (2017-02-30)
      raise DataError(f"{path}, line {lines[i]}: cannot read date {str(text)!r}; expected "
                      "YYYY-MM-DD[ HH:MM[:SS]] (or with '/')") from None
  return dates


def _iso_date(text: str) -> str:
  match = _DATE.fullmatch(text.strip())
  if match is None:
    raise ValueError(text)
  year, month, day, hour, minute, second = (int(g or 0) for g in match.groups())
  return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"


def read_idx_gz(path: pathlib.Path, ndim: int) -> np.ndarray:
  """An MNIST-style IDX file (gzip): magic 0x0000080<ndim> (uint8), big-endian dims, then the bytes."""
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"{path} is not a readable gzip file ({e})") from e
  header_size = 4 + 4 * ndim
  if len(raw) < header_size or raw[:4] != bytes([0, 0, 8, ndim]):
    raise DataError(f"{path} is not an IDX file of {ndim}-D uint8 data (magic {raw[:4].hex()})")
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=header_size)
  if data.size != np.prod(shape):
    raise DataError(f"{path}: header says {shape} = {np.prod(shape)} bytes of data, found {data.size}")
  return data.reshape(shape)


def read_mnist_split(dataset: ImageDataset, manual_dir: str, prefix: str, num_classes: int):
  """Images [n, H, W, 1] uint8 and labels [n] of one split (`train` or `t10k`) of an MNIST-format set."""
  paths = [raw_file(manual_dir, f"{prefix}-{kind}-ubyte.gz", dataset.name, dataset.source)
           for kind in ("images-idx3", "labels-idx1")]
  images, labels = read_idx_gz(paths[0], ndim=3), read_idx_gz(paths[1], ndim=1)
  if len(images) != len(labels):
    raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
  if labels.max(initial=0) >= num_classes:
    raise DataError(f"{paths[1]}: label {labels.max()} out of range 0..{num_classes - 1}")
  return images[..., None], labels


def read_text_splits(dataset: TextDataset, manual_dir: str) -> dict[str, str]:
  """split -> text of a corpus, cut as `dataset.layout` says (see catalog.TextDataset)."""
  if dataset.layout == "one_file":
    text = read_text(raw_file(manual_dir, dataset.files[0], dataset.name, dataset.source))
    if dataset.num_chars is not None and len(text) != dataset.num_chars:
      raise DataError(f"{dataset.files[0]}: {len(text)} characters, but the published file has "
                      f"{dataset.num_chars}; it looks truncated or is another version. Get it "
                      f"again from {dataset.source}.")
    num_train = int(len(text) * 0.9)            # as TFDS's tiny_shakespeare: 90 / 5 / 5 %
    num_val = int((len(text) - num_train) * 0.5)
    return {"train": text[:num_train], "validation": text[num_train:num_train + num_val],
            "test": text[num_train + num_val:]}
  texts = {}
  for split, file in dataset.split_files:
    if file in dataset.optional_files and not (pathlib.Path(manual_dir).expanduser() / file).is_file():
      continue
    texts[split] = read_text(raw_file(manual_dir, file, dataset.name, dataset.source))
  return texts


def read_text(path: pathlib.Path) -> str:
  """A UTF-8 text file as it is (newlines kept); refused if empty or not UTF-8."""
  try:
    text = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
  if not text:
    raise DataError(f"{path} is empty")
  return text


def _read_csv(path: pathlib.Path, has_header: bool) -> tuple[list[str], list[int], np.ndarray]:
  """(header, line number of each data row, cells [rows, columns] as str); blank lines are skipped."""
  # utf-8-sig: drops a byte-order mark (spreadsheet exports); errors='replace': the published
  # weather.csv header has mojibake, which only affects column names.
  with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
    reader = csv.reader(f)
    numbered = [(reader.line_num, row) for row in reader if row]
  if has_header:
    if not numbered:
      raise DataError(f"{path} is empty")
    header = numbered.pop(0)[1]
  else:
    header = numbered[0][1] if numbered else []
  if not numbered:
    raise DataError(f"{path} has no data rows")
  for line, row in numbered:
    if len(row) != len(header):
      what = "the header has" if has_header else "the first line has"
      raise DataError(f"{path}, line {line}: {len(row)} fields, but {what} {len(header)}")
  return header, [line for line, _ in numbered], np.array([row for _, row in numbered], dtype=str)


def _check_header(path: pathlib.Path, header: list[str], dataset: SeriesDataset) -> None:
  duplicates = sorted({c for c in header if header.count(c) > 1})
  if duplicates:
    raise DataError(f"{path}: duplicate column(s) {duplicates}")
  if dataset.columns is not None:
    expected = list(dataset.columns)
    missing = [c for c in expected if c not in header]
    extra = [c for c in header if c not in expected]
    if header != expected:
      problems = []
      if missing:
        problems.append(f"missing column(s) {missing}")
      if extra:
        problems.append(f"unexpected column(s) {extra}")
      raise DataError(f"{path}: {'; '.join(problems) or 'columns out of order'}; expected the header "
                      f"{','.join(expected)}")
    return
  for required in (DATE_COLUMN, TARGET_COLUMN):
    if required not in header:
      raise DataError(f"{path}: missing column {required!r}; the `custom` protocol needs a "
                      f"{DATE_COLUMN!r} column and the target column {TARGET_COLUMN!r} (header: {header})")
  num_vars = len(header) - 1
  if dataset.num_vars is not None and num_vars != dataset.num_vars:
    raise DataError(f"{path}: {num_vars} value columns besides {DATE_COLUMN!r}, but the published "
                    f"{dataset.file} has {dataset.num_vars} (a missing or extra column?)")


def _parse_numbers(path: pathlib.Path, cells: np.ndarray, columns: tuple[str, ...],
                   lines: list[int]) -> np.ndarray:
  """str cells -> float64; an unparsable, NaN or infinite cell is refused with its line and column."""
  try:
    values = cells.astype(np.float64)
  except ValueError:
    values = _parse_cell_by_cell(path, cells, columns, lines)
  if not np.isfinite(values).all():
    row, col = np.argwhere(~np.isfinite(values))[0]
    raise DataError(f"{path}, line {lines[row]}, column {columns[col]!r}: value {str(cells[row, col])!r} "
                    "is NaN or infinite (missing data?)")
  return values


def _parse_cell_by_cell(path: pathlib.Path, cells: np.ndarray, columns: tuple[str, ...],
                        lines: list[int]) -> np.ndarray:
  """The slow path, taken only when numpy refused a cell: find it (or accept what float() accepts)."""
  values = np.empty(cells.shape, np.float64)
  for (row, col), cell in np.ndenumerate(cells):
    try:
      values[row, col] = float(cell)
    except ValueError:
      raise DataError(f"{path}, line {lines[row]}, column {columns[col]!r}: cannot read {str(cell)!r} "
                      "as a number") from None
  return values
