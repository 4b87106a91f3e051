"""`data.load(config_data, split)`: the split the training loop consumes, preparing the dataset if asked."""
from __future__ import annotations

from typing import Any, Mapping

from data import builders, catalog, images, series, text, timefeatures, tokenizers
from data.errors import DataError
from data.splits import ClassificationSplit, ForecastingSplit, TokenSplit


def load(config_data: Mapping[str, Any],
         split: str) -> ForecastingSplit | ClassificationSplit | TokenSplit:
  """Split 'train' | 'validation' | 'test' of dataset `config_data.name`.

  config_data (an ml_collections ConfigDict or a dict): name, data_dir ('' = $TFDS_DATA_DIR or
  ~/tensorflow_datasets), manual_dir ('' = none; if set, a dataset not yet prepared is prepared from
  it; 'image_folder' always needs it: it names the tree), file (dataset 'custom' only),
  validation_fraction ('image_folder' without val/ only, 0.0); forecasting: seq_len, pred_len, freq
  ('h'), time_marks (default: whether the dataset has timestamps), scale (True); language
  modelling: seq_len (tokens per training sequence), tokenizer ('byte' or a tokenizer file).
  """
  name, file = config_data.get("name", ""), config_data.get("file", "")
  manual_dir = config_data.get("manual_dir", "")
  validation_fraction = config_data.get("validation_fraction", 0.0)
  tokenizer, seq_len = config_data.get("tokenizer", "byte"), config_data.get("seq_len") or 0
  dataset = catalog.lookup(name, file, manual_dir, validation_fraction, tokenizer, seq_len)
  builder = builders.make_builder(dataset, config_data.get("data_dir", ""))
  if not builders.is_prepared(builder):
    if builders.raw_file_names(dataset) and not manual_dir:   # digits needs no files
      raise DataError(_not_prepared_message(dataset, name, file, builder.data_dir_root))
    builder = builders.prepare(name, manual_dir, config_data.get("data_dir", ""), file,
                               validation_fraction, tokenizer, seq_len)
  dataset_dir = str(builder.data_path)
  if isinstance(dataset, catalog.ImageDataset):
    return images.load_split(dataset_dir, dataset, split)
  if isinstance(dataset, catalog.TextDataset):
    return text.load_split(dataset_dir, split)
  return series.load_split(dataset_dir, dataset, split, _series_options(config_data, dataset))


def abstract_meta(config_data: Mapping[str, Any]) -> dict[str, Any]:
  """What `load(config_data, split).meta` says that a model and a batch's shape depend on, from the
  catalog's facts and the config alone: no file is read or prepared (aot.py compiles a step from it).

  Images: num_classes, image_shape (stored H, W, C; None for sizes that vary per image). Series:
  n_vars, n_marks. Text: seq_len, and vocab_size for the byte tokenizer (a tokenizer file's
  vocabulary is known only from the file: left out, the model's default applies). A config that
  names no dataset (a private corpus) gives {}. Raises DataError for a fact the catalog lacks.
  """
  name = config_data.get("name", "")
  if not name:
    return {}
  tokenizer, seq_len = config_data.get("tokenizer", "byte"), config_data.get("seq_len") or 0
  dataset = catalog.lookup(name, config_data.get("file", ""), config_data.get("manual_dir", ""),
                           config_data.get("validation_fraction", 0.0), tokenizer, seq_len)
  if isinstance(dataset, catalog.TextDataset):
    byte = dataset.tokenizer == tokenizers.BYTE
    vocab = {"vocab_size": tokenizers.ByteTokenizer.vocab_size} if byte else {}
    return {"seq_len": dataset.seq_len, **vocab}
  if isinstance(dataset, catalog.ImageDataset):
    if dataset.num_classes is None or dataset.image_shape is None:
      raise DataError(f"dataset {dataset.name!r}: its classes and image shape are known only from "
                      "its prepared files; the catalog does not record them")
    return {"num_classes": dataset.num_classes, "image_shape": dataset.image_shape}
  if dataset.num_vars is None:
    raise DataError(f"dataset {dataset.name!r}: its number of variates is known only from its "
                    "file; the catalog does not record it")
  options = _series_options(config_data, dataset)
  n_marks = len(timefeatures.feature_names(options.freq)) if options.time_marks else 0
  return {"n_vars": dataset.num_vars, "n_marks": n_marks}


def _series_options(config_data: Mapping[str, Any], dataset: catalog.SeriesDataset) -> series.SeriesOptions:
  missing = [key for key in ("seq_len", "pred_len") if config_data.get(key) is None]
  if missing:
    raise DataError(f"forecasting dataset {dataset.name!r} needs config.data.{' and config.data.'.join(missing)}")
  return series.SeriesOptions(
      seq_len=int(config_data.get("seq_len")), pred_len=int(config_data.get("pred_len")),
      freq=config_data.get("freq", "h"), scale=bool(config_data.get("scale", True)),
      time_marks=bool(config_data.get("time_marks", dataset.protocol.has_dates)))


def _not_prepared_message(dataset, name: str, file: str, data_dir) -> str:
  files = " ".join(builders.raw_file_names(dataset))
  file_flag = f" --file {file}" if file else ""
  if isinstance(dataset, catalog.TextDataset):
    file_flag = f" --tokenizer {dataset.tokenizer} --seq_len {dataset.seq_len}"
  return (f"dataset {name!r} is not prepared in {data_dir}. Prepare it once with\n"
          f"  python -m data.prepare {name} --manual_dir DIR --data_dir {data_dir}{file_flag}\n"
          f"where DIR holds {files} (from {dataset.source}), or set config.data.manual_dir=DIR to "
          "prepare it on first use.")
