"""Datasets of the zoo: TFDS builders for local raw files (no TensorFlow needed) and grain pipelines.

  python -m data.prepare ett_h1 --manual_dir ~/data/ETT-small     # once: raw CSV -> TFDS ArrayRecord

  split = data.load(config.data, "train")          # ForecastingSplit | ClassificationSplit | TokenSplit
  len(split); split.gather(np.arange(32)); split.spec; split.meta
  data.abstract_meta(config.data)   # what split.meta tells a model, from the catalog (no files)
  data.train_batches(split, batch_size, seed, input_config=config.input)   # element e = step e
  data.eval_batches(split, batch_size, input_config=config.input)   # each example once, + 'mask'

Image splits are augmented (training) or resized and center-cropped (evaluation) as config.input
says: see data/augment.py. Dataset names: `data.DATASETS`, and 'custom' for any CSV of the
iTransformer custom protocol, 'image_folder' for any class-per-subfolder tree of JPEG/PNG images.
Text corpora (tiny_shakespeare, wikitext2) are tokenized (data/tokenizers.py: bytes, or a
SentencePiece / HF tokenizers file) and packed into sequences of config.data.seq_len (+1) tokens.
"""
from data.catalog import CUSTOM, DATASETS, IMAGE_FOLDER
from data.errors import DataError
from data.loading import abstract_meta, load
from data.pipeline import eval_batches, steps_per_epoch, train_batches
from data.splits import ClassificationSplit, EncodedImageSplit, ForecastingSplit, TokenSplit
from data.tokenizers import get_tokenizer

__all__ = ["CUSTOM", "DATASETS", "IMAGE_FOLDER", "ClassificationSplit", "DataError",
           "EncodedImageSplit", "ForecastingSplit", "TokenSplit", "abstract_meta", "eval_batches",
           "get_tokenizer", "load", "steps_per_epoch", "train_batches"]
