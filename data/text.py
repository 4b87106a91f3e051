"""Language-model corpora: packing a token stream into training sequences, and a prepared
`zoo_text` dataset -> `TokenSplit`.

Packing (fairseq's `--sample-break-mode none`, nanoGPT's blocks without overlap): sequence i holds
stream tokens [i L, i L + L + 1) (L = seq_len): inputs are its first L tokens, targets its last L,
so consecutive sequences share one token and every stream token but the first is a target exactly
once. The last sequence of a split is zero-padded; `num_tokens` says how many tokens are real.
"""
from __future__ import annotations

import functools

import numpy as np
import tensorflow_datasets as tfds

from data.errors import DataError
from data.splits import TokenSplit


def pack(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(records int32 [n, seq_len + 1], num_tokens int32 [n]) of a token stream (see the module)."""
  if seq_len < 1:
    raise DataError(f"seq_len must be positive, got {seq_len}")
  if len(stream) < 2:
    raise DataError(f"a split of {len(stream)} token(s) has nothing to predict; it needs >= 2")
  num_records = -(-(len(stream) - 1) // seq_len)
  starts = np.arange(num_records) * seq_len
  padded = np.zeros(num_records * seq_len + 1, np.int32)
  padded[:len(stream)] = stream
  records = padded[starts[:, None] + np.arange(seq_len + 1)]
  return records, np.minimum(len(stream) - starts, seq_len + 1).astype(np.int32)


def load_split(dataset_dir: str, split: str) -> TokenSplit:
  records, num_tokens, metadata = _read_split(dataset_dir, split)
  counts = metadata["splits"][split]
  meta = {"vocab_size": int(metadata["vocab_size"]), "seq_len": int(metadata["seq_len"]),
          "tokenizer": metadata["tokenizer"], "num_tokens": int(counts["num_tokens"]),
          "num_bytes": int(counts["num_bytes"]),
          # the split's text bytes per token: bits per byte = nats per token / ln 2 / this
          "bytes_per_token": counts["num_bytes"] / counts["num_tokens"]}
  return TokenSplit(records, num_tokens, meta)


@functools.lru_cache(maxsize=8)
def _read_split(dataset_dir: str, split: str):
  """Every record of a split, in memory (cached per process), and the dataset's metadata."""
  builder = tfds.builder_from_directory(dataset_dir)
  if split not in builder.info.splits:
    raise DataError(f"{builder.info.full_name} has no split {split!r}; it has "
                    f"{list(builder.info.splits)} (WikiText-2's train split needs "
                    "wiki.train.tokens in manual_dir when preparing)")
  source = builder.as_data_source(split)
  records = source.__getitems__(range(len(source)))
  tokens = np.stack([r["tokens"] for r in records]).astype(np.int32)
  num_tokens = np.array([r["num_tokens"] for r in records], np.int32)
  for array in (tokens, num_tokens):
    array.flags.writeable = False   # shared by every caller of the process (cached)
  return tokens, num_tokens, dict(builder.info.metadata)
