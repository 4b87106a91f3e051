"""Build a zoo dataset once from its raw files: TFDS ArrayRecord in data_dir, read later by `data.load`.

  python -m data.prepare NAME --manual_dir DIR [--data_dir D] [--file F] [--validation_fraction F]
  python -m data.prepare tiny_shakespeare --manual_dir DIR [--tokenizer byte|FILE] [--seq_len 256]

A missing or malformed raw file is refused with a message that says what is wrong and where to get the
file (exit status 2).
"""
from __future__ import annotations

import argparse
import sys

from data import builders, catalog
from data.errors import DataError


def _catalog_text() -> str:
  lines = ["datasets (NAME: raw files in --manual_dir, and where to get them):"]
  for dataset in catalog.DATASETS.values():
    files = " ".join(builders.raw_file_names(dataset)) or "(embedded, no files)"
    lines.append(f"  {dataset.name}: {files}")
  lines += [f"  {catalog.CUSTOM}: --file F, any CSV with a `date` column and the target `OT` "
            "(prepared as custom_<file stem>)",
            f"  {catalog.IMAGE_FOLDER}: --manual_dir DIR is the tree, DIR/train/<class>/*.jpg|png, "
            "optionally DIR/val/ (or --validation_fraction F of train/) and DIR/test/ (prepared as "
            "image_folder_<DIR name>)",
            "text corpora (tiny_shakespeare, wikitext2) are prepared per --tokenizer and "
            "--seq_len; wikitext2's train split is prepared when wiki.train.tokens is there too",
            f"sources: ETT: {catalog.ETT_SOURCE}; Fashion-MNIST: {catalog.FASHION_MNIST_SOURCE}; "
            f"ImageNet: {catalog.IMAGENET_SOURCE}; tiny Shakespeare: "
            f"{catalog.TINY_SHAKESPEARE_SOURCE}; WikiText-2: {catalog.WIKITEXT2_SOURCE}; the "
            f"others: {catalog.BUNDLE_SOURCE}."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0],
                                   epilog=_catalog_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", help="zoo dataset name (config.data.name)")
  parser.add_argument("--manual_dir", default="", help="folder holding the raw file(s)")
  parser.add_argument("--data_dir", default="", help="TFDS data dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--file", default="", help="the CSV of dataset 'custom' (in --manual_dir)")
  parser.add_argument("--validation_fraction", type=float, default=0.0,
                      help="image_folder without val/: hold out this share of train/")
  parser.add_argument("--tokenizer", default="byte",
                      help="text corpora: 'byte' or a SentencePiece .model / HF tokenizers .json file")
  parser.add_argument("--seq_len", type=int, default=256,
                      help="text corpora: tokens per training sequence (config.data.seq_len)")
  args = parser.parse_args(argv)
  try:
    builder = builders.prepare(args.name, args.manual_dir, args.data_dir, args.file,
                               args.validation_fraction, args.tokenizer, args.seq_len)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sizes = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
  print(f"{args.name}: prepared in {builder.data_path} ({sizes})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
