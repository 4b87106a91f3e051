"""The zoo's dataset names (what configs put in `config.data.name`) and what each one reads.

Series datasets name their raw file, the official protocol that splits it and what the file must look
like; image datasets name their files. Every entry also says where the raw files come from, so a
missing file can be refused with a useful message.
"""
from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re

from data import protocols
from data.errors import DataError

ETT_SOURCE = "https://github.com/zhouhaoyi/ETDataset (folder ETT-small)"
BUNDLE_SOURCE = ("the Autoformer/iTransformer Google-Drive dataset bundle linked from the READMEs of "
                 "https://github.com/thuml/iTransformer and https://github.com/thuml/Autoformer")
FASHION_MNIST_SOURCE = "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)"
IMAGENET_SOURCE = ("https://image-net.org (ILSVRC2012, after registration): "
                   "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, or their extracted "
                   "folders train/<wnid>/ and val/")
TINY_SHAKESPEARE_SOURCE = "https://github.com/karpathy/char-rnn (data/tinyshakespeare/input.txt)"
WIKITEXT2_SOURCE = ("WikiText-2 (tokenized, v1; Merity et al. 2016): wikitext-2-v1.zip of the "
                    "WikiText release, or https://github.com/pytorch/examples (folder "
                    "word_language_model/data/wikitext-2)")
WIKITEXT103_SOURCE = ("WikiText-103 (tokenized, v1; Merity et al. 2016): wikitext-103-v1.zip of "
                      "the WikiText release (fairseq's examples/language_model/"
                      "prepare-wikitext-103.sh fetches the same files)")
IMAGE_FOLDER_SOURCE = ("your own images: DIR/train/<class>/*.jpg|png, optionally DIR/val/ and "
                       "DIR/test/ alike")
ETT_COLUMNS = ("date", "HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")


@dataclasses.dataclass(frozen=True)
class SeriesDataset:
  name: str
  file: str
  protocol: protocols.Protocol
  source: str                              # where to get `file`
  columns: tuple[str, ...] | None = None   # exact header (ETT), else only `date` and `OT` are required
  num_rows: int | None = None              # rows the published file has (None: not checked)
  num_vars: int | None = None              # value columns the published file has (None: not checked)
  task: str = "forecasting"


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  name: str
  files: tuple[str, ...]   # raw files in manual_dir; () for a dataset embedded in an installed package
  source: str
  pixel_max: int           # images are served as pixel / pixel_max, in [0, 1]
  task: str = "classification"
  # 'arrays': pixels stored as uint8 tensors of one shape (small sets, read into memory);
  # 'image_folder' | 'imagenet': the image files' bytes stored as they are, decoded when read.
  layout: str = "arrays"
  root: str = ""                     # image_folder: the tree it was listed from (its manual_dir)
  validation_fraction: float = 0.0   # image_folder without val/: share of train/ held out
  # What a model is built for, known before the files are read (data.abstract_meta); None: known
  # only from the prepared files (an image folder's classes), or a size that varies per image.
  num_classes: int | None = None
  image_shape: tuple[int | None, int | None, int] | None = None   # stored (H, W, C)

  @property
  def encoded(self) -> bool:
    return self.layout != "arrays"


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """A text corpus for language modelling, prepared per tokenizer and sequence length.

  `layout` says how the raw files make the splits: 'one_file' (TFDS's tiny_shakespeare: the
  first 90% of the characters train, the next 5% validation, the last 5% test) or 'split_files'
  (one file per split, `split_files`; those in `optional_files` may be missing).
  """
  name: str
  files: tuple[str, ...]              # required raw files in manual_dir
  source: str
  layout: str
  split_files: tuple[tuple[str, str], ...] = ()   # 'split_files': (split, file name)
  optional_files: tuple[str, ...] = ()
  num_chars: int | None = None        # characters the published file has (None: not checked)
  tokenizer: str = "byte"             # data.tokenizers.get_tokenizer spec
  seq_len: int = 0                    # tokens per training sequence (inputs; targets shift by 1)
  task: str = "language_modeling"


def _ett(name: str, file: str, protocol: protocols.Protocol, num_rows: int) -> SeriesDataset:
  return SeriesDataset(name, file, protocol, ETT_SOURCE, columns=ETT_COLUMNS, num_rows=num_rows,
                       num_vars=len(ETT_COLUMNS) - 1)


def _bundle(name: str, file: str, protocol: protocols.Protocol, **expected) -> SeriesDataset:
  return SeriesDataset(name, file, protocol, f"{BUNDLE_SOURCE}, file {file}", **expected)


DATASETS: dict[str, SeriesDataset | ImageDataset | TextDataset] = {d.name: d for d in [
    _ett("ett_h1", "ETTh1.csv", protocols.ETT_HOUR, 17420),
    _ett("ett_h2", "ETTh2.csv", protocols.ETT_HOUR, 17420),
    _ett("ett_m1", "ETTm1.csv", protocols.ETT_MINUTE, 69680),
    _ett("ett_m2", "ETTm2.csv", protocols.ETT_MINUTE, 69680),
    _bundle("weather", "weather.csv", protocols.CUSTOM, num_rows=52696, num_vars=21),
    _bundle("exchange_rate", "exchange_rate.csv", protocols.CUSTOM, num_rows=7588, num_vars=8),
    _bundle("illness", "national_illness.csv", protocols.CUSTOM, num_rows=966, num_vars=7),
    _bundle("electricity", "electricity.csv", protocols.CUSTOM, num_rows=26304, num_vars=321),
    _bundle("traffic", "traffic.csv", protocols.CUSTOM, num_rows=17544, num_vars=862),
    # Solar and PEMS are checked for structure only: no copy of the published files was at hand to
    # confirm their shapes against.
    _bundle("solar", "solar_AL.txt", protocols.SOLAR),
    *(_bundle(f"pems{n}", f"PEMS{n}.npz", protocols.PEMS) for n in ("03", "04", "07", "08")),
    ImageDataset("fashion_mnist", ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                   "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
                 FASHION_MNIST_SOURCE, pixel_max=255, num_classes=10, image_shape=(28, 28, 1)),
    ImageDataset("digits", (), "scikit-learn (sklearn.datasets.load_digits), installed with the zoo",
                 pixel_max=16, num_classes=10, image_shape=(8, 8, 1)),
    TextDataset("tiny_shakespeare", ("input.txt",), TINY_SHAKESPEARE_SOURCE, layout="one_file",
                num_chars=1_115_394),
    TextDataset("wikitext2", ("wiki.valid.tokens", "wiki.test.tokens"), WIKITEXT2_SOURCE,
                layout="split_files", optional_files=("wiki.train.tokens",),
                split_files=(("train", "wiki.train.tokens"), ("validation", "wiki.valid.tokens"),
                             ("test", "wiki.test.tokens"))),
    TextDataset("wikitext103", ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
                WIKITEXT103_SOURCE, layout="split_files",
                split_files=(("train", "wiki.train.tokens"), ("validation", "wiki.valid.tokens"),
                             ("test", "wiki.test.tokens"))),
    ImageDataset("imagenet2012", ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
                 IMAGENET_SOURCE, pixel_max=255, layout="imagenet", num_classes=1000,
                 image_shape=(None, None, 3)),
]}
CUSTOM = "custom"   # any CSV of the iTransformer `custom` protocol; the user names the file
IMAGE_FOLDER = "image_folder"   # any class-per-subfolder tree of JPEG/PNG images (manual_dir)


def lookup(name: str, file: str = "", manual_dir: str = "", validation_fraction: float = 0.0,
           tokenizer: str = "byte", seq_len: int = 0
           ) -> SeriesDataset | ImageDataset | TextDataset:
  """The catalog entry of a zoo dataset name; `custom` needs `file` (a CSV in manual_dir),
  `image_folder` needs `manual_dir` (the tree's root), a text corpus gets `tokenizer` and
  `seq_len` (> 0)."""
  if name == CUSTOM:
    return custom_dataset(file)
  if name == IMAGE_FOLDER:
    return image_folder_dataset(manual_dir, validation_fraction)
  if name not in DATASETS:
    known = ", ".join([*DATASETS, CUSTOM, IMAGE_FOLDER])
    raise DataError(f"unknown dataset {name!r}{_suggestion(name)}; known: {known}")
  dataset = DATASETS[name]
  if isinstance(dataset, TextDataset):
    if seq_len < 1:
      raise DataError(f"language-model dataset {name!r} needs a sequence length: config.data."
                      f"seq_len (or --seq_len) > 0, got {seq_len}")
    return dataclasses.replace(dataset, tokenizer=tokenizer or "byte", seq_len=int(seq_len))
  return dataset


def _suggestion(name: str) -> str:
  def squeeze(s):   # 'ETTh1' and 'ett_h1' are the same name to a reader
    return re.sub(r"[^a-z0-9]", "", s.lower())
  same = [known for known in DATASETS if squeeze(known) == squeeze(name)]
  close = same or difflib.get_close_matches(name, [*DATASETS, CUSTOM, IMAGE_FOLDER], n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def custom_dataset(file: str) -> SeriesDataset:
  """A user's CSV read like the official `Dataset_Custom`; its prepared name is `custom_<stem>`."""
  if not file:
    raise DataError("dataset 'custom' needs the CSV to read: `python -m data.prepare custom "
                    "--manual_dir DIR --file my.csv` (config: data.file='my.csv')")
  stem = re.sub(r"[^a-z0-9]+", "_", pathlib.Path(file).stem.lower()).strip("_")
  return SeriesDataset(f"{CUSTOM}_{stem}", file, protocols.CUSTOM,
                       source="your own file (a CSV with a `date` column and the target column `OT`)")


def image_folder_dataset(manual_dir: str, validation_fraction: float = 0.0) -> ImageDataset:
  """A user's image tree, prepared as `image_folder_<folder name>` (+ `_val<fraction>`)."""
  if not manual_dir:
    raise DataError("dataset 'image_folder' needs the tree's root: `python -m data.prepare "
                    "image_folder --manual_dir DIR` (config: data.manual_dir=DIR) with "
                    "DIR/train/<class>/*.jpg|png")
  folder_name = pathlib.Path(manual_dir).expanduser().resolve().name
  stem = re.sub(r"[^a-z0-9]+", "_", folder_name.lower()).strip("_")
  name = f"{IMAGE_FOLDER}_{stem or 'root'}"
  if validation_fraction:
    name += "_val" + f"{validation_fraction:g}".replace(".", "p")
  return ImageDataset(name, ("train/",), IMAGE_FOLDER_SOURCE, pixel_max=255, layout="image_folder",
                      root=str(pathlib.Path(manual_dir).expanduser()),
                      validation_fraction=validation_fraction)
