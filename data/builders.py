"""TFDS builders that need no TensorFlow: local raw files in, ArrayRecord out; and `prepare`.

Only Tensor / Scalar / Text / ClassLabel features (an Image feature would need TF to encode PNG), and
always prepared with `file_format='array_record'` (the default tfrecord writer needs TF). Names carry a
`zoo_` prefix so they never collide with TFDS built-ins (TFDS has its own `fashion_mnist`).

- `zoo_series/<name>`: one record per row of a time series: `row` (index in the file), `values` (all
  variates, float64 as in the file), `date` (ISO text, for files with timestamps). TFDS splits hold
  each split's target rows, in row order (`disable_shuffling=True`: TFDS would shuffle otherwise).
- `zoo_fashion_mnist`, `zoo_digits`: `image` uint8 [H, W, 1] and `label`, in file order.
- `zoo_imagenet2012`, `zoo_image_folder/<name>`: `image` = the image file's bytes as they are
  (JPEG or PNG, decoded with PIL when read: no TensorFlow), `label` and `file_name`, in file order.
- `zoo_text/<corpus>_<tokenizer>_s<seq_len>`: a corpus tokenized and packed: one record per
  training sequence, `tokens` int32 [seq_len + 1] (record i = stream tokens [i L, i L + L + 1),
  zero-padded at the end of a split) and `num_tokens` (the real ones), in stream order. The
  metadata holds the tokenizer, vocab_size, seq_len and each split's token and UTF-8 byte counts.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
import sklearn.datasets
import tensorflow_datasets as tfds

from data import catalog, image_files, protocols, raw_files, text, tokenizers

VERSION = tfds.core.Version("1.0.0")


@dataclasses.dataclass(eq=False)
class SeriesConfig(tfds.core.BuilderConfig):
  # repr=False: TFDS logs the repr of every `custom` config it is given
  dataset: catalog.SeriesDataset | None = dataclasses.field(default=None, repr=False)


def series_config(dataset: catalog.SeriesDataset) -> SeriesConfig:
  return SeriesConfig(name=dataset.name, description=f"{dataset.file} ({dataset.protocol.name} protocol)",
                      dataset=dataset)


class ZooSeries(tfds.core.GeneratorBasedBuilder):
  """Multivariate time series of the iTransformer benchmarks (and any CSV of the `custom` protocol)."""
  VERSION = VERSION
  BUILDER_CONFIGS = [series_config(d) for d in catalog.DATASETS.values()
                     if isinstance(d, catalog.SeriesDataset)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the raw file in manual_dir; see `python -m data.prepare --help`."

  def _info(self) -> tfds.core.DatasetInfo:
    features = {"row": tfds.features.Scalar(np.int64),
                # BYTES: raw float64 (the default encoding would store float32 in a float_list).
                "values": tfds.features.Tensor(shape=(None,), dtype=np.float64, encoding="bytes")}
    if self.builder_config.dataset.protocol.has_dates:
      features["date"] = tfds.features.Text()
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 disable_shuffling=True, metadata=tfds.core.MetadataDict(),
                                 description=f"Source: {self.builder_config.dataset.source}.")

  def _split_generators(self, dl_manager):
    dataset = self.builder_config.dataset
    series = raw_files.read_series(dataset, str(dl_manager.manual_dir))
    self.info.metadata["columns"] = list(series.columns)
    return {split: self._generate_examples(series, rows)
            for split, rows in protocols.stored_rows(dataset.protocol, len(series.values)).items()}

  def _generate_examples(self, series: raw_files.RawSeries, rows):
    for row in rows:
      record = {"row": row, "values": series.values[row]}
      if series.dates is not None:
        record["date"] = str(series.dates[row])
      yield row, record


class _ImageClassification:
  """What the image builders share: features and one record per image, in file order."""

  def _image_info(self, image_shape, class_names) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True, supervised_keys=("image", "label"),
        features=tfds.features.FeaturesDict({
            # BYTES: raw pixels, 4x faster to write than the default (one int64 per pixel).
            "image": tfds.features.Tensor(shape=image_shape, dtype=np.uint8, encoding="bytes"),
            "label": tfds.features.ClassLabel(names=class_names)}))

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}


class ZooFashionMnist(_ImageClassification, tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from the four original IDX .gz files (train 60000, test 10000)."""
  VERSION = VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put the four *-ubyte.gz files of {catalog.FASHION_MNIST_SOURCE} in manual_dir."
  CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                 "Bag", "Ankle boot")

  def _info(self) -> tfds.core.DatasetInfo:
    return self._image_info((28, 28, 1), self.CLASS_NAMES)

  def _split_generators(self, dl_manager):
    dataset = catalog.DATASETS["fashion_mnist"]
    return {split: self._generate_examples(*raw_files.read_mnist_split(
                dataset, str(dl_manager.manual_dir), prefix, len(self.CLASS_NAMES)))
            for split, prefix in (("train", "train"), ("test", "t10k"))}


class ZooDigits(_ImageClassification, tfds.core.GeneratorBasedBuilder):
  """scikit-learn's embedded 8x8 digits (1797 images, pixels 0..16): nothing to download.

  Fixed split: `numpy.random.default_rng(0).permutation(1797)`; its first int(0.7 n) = 1257 indices are
  train, the next int(0.1 n) = 179 validation, the remaining 361 test.
  """
  VERSION = VERSION
  SPLIT_SEED = 0

  def _info(self) -> tfds.core.DatasetInfo:
    return self._image_info((8, 8, 1), [str(d) for d in range(10)])

  def _split_generators(self, dl_manager):
    del dl_manager
    digits = sklearn.datasets.load_digits()
    images, labels = digits.images.astype(np.uint8)[..., None], digits.target
    order = np.random.default_rng(self.SPLIT_SEED).permutation(len(labels))
    num_train, num_val = int(0.7 * len(order)), int(0.1 * len(order))
    parts = {"train": order[:num_train], "validation": order[num_train:num_train + num_val],
             "test": order[num_train + num_val:]}
    return {split: self._generate_examples(images[idx], labels[idx]) for split, idx in parts.items()}


class _EncodedImageClassification:
  """What the builders of encoded images share: features and records passed through as read."""

  def _encoded_info(self, class_names) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True, supervised_keys=("image", "label"),
        features=tfds.features.FeaturesDict({
            # The file's bytes: an Image feature would re-encode them, and encoding needs TF.
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "label": tfds.features.ClassLabel(names=class_names),
            "file_name": tfds.features.Text()}))

  def _generate_examples(self, examples):
    yield from examples


class ZooImagenet2012(_EncodedImageClassification, tfds.core.GeneratorBasedBuilder):
  """ILSVRC2012 from the user's tars or extracted folders (train 1,281,167, validation 50,000)."""
  VERSION = VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put in manual_dir, from {catalog.IMAGENET_SOURCE}."

  def _info(self) -> tfds.core.DatasetInfo:
    return self._encoded_info(image_files.imagenet_wnids())

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(image_files.imagenet_examples(source, split))
            for split, source in image_files.imagenet_sources(str(dl_manager.manual_dir)).items()}


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  tree: image_files.ImageFolderTree | None = dataclasses.field(default=None, repr=False)


class ZooImageFolder(_EncodedImageClassification, tfds.core.GeneratorBasedBuilder):
  """A class-per-subfolder tree of JPEG/PNG images; one config per tree, made when it is used."""
  VERSION = VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"manual_dir is the tree: {catalog.IMAGE_FOLDER_SOURCE}."

  def _info(self) -> tfds.core.DatasetInfo:
    return self._encoded_info(self.builder_config.tree.class_names)

  def _split_generators(self, dl_manager):
    del dl_manager   # the tree was listed from the dataset's root when the config was made
    tree = self.builder_config.tree
    return {split: self._generate_examples(image_files.image_folder_examples(tree, split))
            for split in tree.splits}


@dataclasses.dataclass(eq=False)
class TextConfig(tfds.core.BuilderConfig):
  dataset: catalog.TextDataset | None = dataclasses.field(default=None, repr=False)


def text_config(dataset: catalog.TextDataset) -> TextConfig:
  """The prepared variant of a corpus: `<corpus>_<tokenizer name>_s<seq_len>`."""
  tokenizer = tokenizers.get_tokenizer(dataset.tokenizer)
  return TextConfig(name=f"{dataset.name}_{tokenizer.name}_s{dataset.seq_len}",
                    description=f"{dataset.name} tokenized by {tokenizer.name}, packed into "
                                f"sequences of {dataset.seq_len} (+1) tokens", dataset=dataset)


class ZooText(tfds.core.GeneratorBasedBuilder):
  """Text corpora for language modelling, tokenized and packed; one config per (tokenizer,
  seq_len), made when it is used."""
  VERSION = VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the corpus' raw files in manual_dir; see `python -m data.prepare --help`."

  def _info(self) -> tfds.core.DatasetInfo:
    seq_len = self.builder_config.dataset.seq_len
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True, metadata=tfds.core.MetadataDict(),
        description=f"Source: {self.builder_config.dataset.source}.",
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(seq_len + 1,), dtype=np.int32, encoding="bytes"),
            "num_tokens": tfds.features.Scalar(np.int32)}))

  def _split_generators(self, dl_manager):
    dataset = self.builder_config.dataset
    tokenizer = tokenizers.get_tokenizer(dataset.tokenizer)
    texts = raw_files.read_text_splits(dataset, str(dl_manager.manual_dir))
    streams = {split: tokenizer.encode(t) for split, t in texts.items()}
    self.info.metadata.update(
        tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size, seq_len=dataset.seq_len,
        splits={split: {"num_tokens": len(streams[split]),
                        "num_bytes": len(t.encode("utf-8"))} for split, t in texts.items()})
    return {split: self._generate_examples(stream, dataset.seq_len)
            for split, stream in streams.items()}

  def _generate_examples(self, stream: np.ndarray, seq_len: int):
    records, num_tokens = text.pack(stream, seq_len)
    for i, (record, count) in enumerate(zip(records, num_tokens)):
      yield i, {"tokens": record, "num_tokens": count}


def resolve_data_dir(data_dir: str) -> str:
  """'' means $TFDS_DATA_DIR, else ~/tensorflow_datasets (as TFDS itself)."""
  return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def make_builder(dataset: catalog.SeriesDataset | catalog.ImageDataset | catalog.TextDataset,
                 data_dir: str) -> tfds.core.DatasetBuilder:
  """The TFDS builder of a catalog entry (prepared or not)."""
  kwargs = dict(data_dir=resolve_data_dir(data_dir), file_format="array_record")
  if isinstance(dataset, catalog.TextDataset):
    return ZooText(config=text_config(dataset), **kwargs)
  if isinstance(dataset, catalog.SeriesDataset):
    registered = dataset.name in catalog.DATASETS   # a `custom` file gets a config made on the fly
    return ZooSeries(config=dataset.name if registered else series_config(dataset), **kwargs)
  if dataset.layout == "image_folder":
    return _image_folder_builder(dataset, **kwargs)
  return {"fashion_mnist": ZooFashionMnist, "digits": ZooDigits,
          "imagenet2012": ZooImagenet2012}[dataset.name](**kwargs)


def _image_folder_builder(dataset: catalog.ImageDataset, data_dir: str,
                          file_format: str) -> tfds.core.DatasetBuilder:
  """A prepared tree is read from its directory (the tree itself may be gone since); else the tree
  is listed (and checked) now, so that a bad tree is refused before TFDS creates anything."""
  prepared = pathlib.Path(data_dir) / ZooImageFolder.name / dataset.name / str(VERSION)
  if (prepared / "dataset_info.json").is_file():
    return tfds.builder_from_directory(str(prepared))
  tree = image_files.read_image_folder(dataset.root, dataset.validation_fraction)
  config = ImageFolderConfig(name=dataset.name, description=f"images of {tree.root}", tree=tree)
  return ZooImageFolder(config=config, data_dir=data_dir, file_format=file_format)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # TFDS's is_prepared() logs a warning for a dataset folder that does not exist yet; skip the noise.
  return builder.data_path.exists() and builder.is_prepared()


def raw_file_names(dataset: catalog.SeriesDataset | catalog.ImageDataset | catalog.TextDataset
                   ) -> tuple[str, ...]:
  return (dataset.file,) if isinstance(dataset, catalog.SeriesDataset) else dataset.files


def prepare(name: str, manual_dir: str = "", data_dir: str = "", file: str = "",
            validation_fraction: float = 0.0, tokenizer: str = "byte",
            seq_len: int = 0) -> tfds.core.DatasetBuilder:
  """Prepares dataset `name` unless it already is; returns its builder."""
  dataset = catalog.lookup(name, file, manual_dir, validation_fraction, tokenizer, seq_len)
  builder = make_builder(dataset, data_dir)
  if is_prepared(builder):
    return builder
  _check_raw_files(dataset, name, manual_dir)   # refuse before TFDS creates anything
  manual_dir = os.path.expanduser(manual_dir) if manual_dir else None
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _check_raw_files(dataset: catalog.SeriesDataset | catalog.ImageDataset | catalog.TextDataset,
                     name: str, manual_dir: str) -> None:
  if isinstance(dataset, catalog.ImageDataset) and dataset.layout == "imagenet":
    image_files.imagenet_sources(manual_dir)   # tars or extracted folders
  elif not (isinstance(dataset, catalog.ImageDataset) and dataset.layout == "image_folder"):
    for raw in raw_file_names(dataset):          # (an image folder was checked when it was listed)
      raw_files.raw_file(manual_dir, raw, name, dataset.source)
