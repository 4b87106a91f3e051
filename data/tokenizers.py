"""Tokenizers of the language-model datasets: bytes (built in, nothing to download) and any
SentencePiece `.model` or Hugging Face `tokenizers` `.json` file a user has.

    tok = get_tokenizer("byte")                  # UTF-8 bytes: vocab 256, no special tokens
    tok = get_tokenizer("~/tok/spm.model")       # needs `pip install sentencepiece` (zoo[lm])
    tok = get_tokenizer("~/tok/tokenizer.json")  # needs `pip install tokenizers` (zoo[lm])
    ids = tok.encode(text); text = tok.decode(ids); tok.vocab_size; tok.name

No special tokens are added (no BOS/EOS): a corpus is one stream of tokens. SentencePiece and HF
tokenizers encode the text one line at a time (each line keeps its newline), so a large corpus is
never one giant call; no token spans a line break.

`name` identifies a tokenizer in the names of prepared datasets: 'byte', or the kind, the file's
stem and the first 8 hex digits of the file's SHA-256 (another file, another dataset).
"""
from __future__ import annotations

import hashlib
import importlib
import pathlib
import re
from typing import Protocol, Sequence

import numpy as np

from data.errors import DataError

BYTE = "byte"
_LINES_PER_CALL = 4096


class Tokenizer(Protocol):
  name: str
  vocab_size: int

  def encode(self, text: str) -> np.ndarray:
    """int32 token ids [n] of `text`."""

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of token ids."""


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255."""
  name = BYTE
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f"byte tokens are 0..255, got ids from {ids.min()} to {ids.max()}")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class _FileTokenizer:
  """What the file-backed tokenizers share: the identifying name and line-wise encoding."""
  kind = ""

  def __init__(self, path: pathlib.Path):
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9]+", "_", path.stem.lower()).strip("_")
    self.name = f"{self.kind}_{stem}_{digest}"
    self.path = path

  def encode(self, text: str) -> np.ndarray:
    lines = text.splitlines(keepends=True)
    pieces = [np.asarray(ids, np.int32) for start in range(0, len(lines), _LINES_PER_CALL)
              for ids in self._encode_lines(lines[start:start + _LINES_PER_CALL])]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)

  def _encode_lines(self, lines: list[str]) -> list[list[int]]:
    raise NotImplementedError


class SentencePieceTokenizer(_FileTokenizer):
  """A SentencePiece model file (`.model`)."""
  kind = "spm"

  def __init__(self, path: pathlib.Path):
    super().__init__(path)
    sentencepiece = _optional_import("sentencepiece", path)
    self._processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    self.vocab_size = self._processor.get_piece_size()

  def _encode_lines(self, lines):
    return self._processor.encode(lines, out_type=int)

  def decode(self, ids) -> str:
    return self._processor.decode([int(i) for i in ids])


class HuggingFaceTokenizer(_FileTokenizer):
  """A Hugging Face `tokenizers` file (`tokenizer.json`)."""
  kind = "hf"

  def __init__(self, path: pathlib.Path):
    super().__init__(path)
    tokenizers = _optional_import("tokenizers", path)
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises a bare Exception on a malformed file
      raise DataError(f"{path} is not a readable Hugging Face tokenizers file ({e})") from e
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode_lines(self, lines):
    return [e.ids for e in self._tokenizer.encode_batch(lines, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _optional_import(package: str, path: pathlib.Path):
  try:
    return importlib.import_module(package)
  except ImportError:
    raise DataError(f"the tokenizer {path} needs the Python package {package!r}: "
                    f"pip install {package} (or the zoo's extra: pip install -e '.[lm]')") from None


_BY_SUFFIX = {".model": SentencePieceTokenizer, ".json": HuggingFaceTokenizer}


def get_tokenizer(spec: str) -> Tokenizer:
  """'byte', or the path of a SentencePiece `.model` / Hugging Face `tokenizers` `.json` file."""
  if spec == BYTE:
    return ByteTokenizer()
  path = pathlib.Path(spec).expanduser()
  if path.suffix not in _BY_SUFFIX:
    raise DataError(f"tokenizer {spec!r}: expected 'byte', a SentencePiece .model file or a "
                    "Hugging Face tokenizers .json file")
  if not path.is_file():
    raise DataError(f"tokenizer file {path} not found")
  return _BY_SUFFIX[path.suffix](path)
