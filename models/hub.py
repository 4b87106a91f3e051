"""Weight files: fetched through the Hugging Face cache, checked, and kept converted.

`fetch(name)` returns the local path of the file a registered `<model>.<tag>` names. Hub files
come through `huggingface_hub.hf_hub_download`, so the HF cache, `HF_HOME`, `HF_HUB_OFFLINE=1` and
tokens work as for timm and transformers; a release outside the hub (a URL) is downloaded into
the same cache, under `zoo-downloads/`. A file whose source publishes a sha256 is checked against
it before it is converted.

`converted_weights(path, family)` returns the zoo's weights for an official file: converted by the
family's `checkpoint_filter_fn` on the first call, then stored as safetensors under
`zoo-converted/` in the cache, keyed by the file and the family's converter source, so that the
next call reads (memory-maps) them instead of converting again.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
import urllib.request
from pathlib import Path
from typing import Mapping

import numpy as np

from models import registry

ZOO_FORMAT = "zoo-weights"  # the safetensors metadata "format" of weights in the zoo's layout
_log = logging.getLogger(__name__)


def cache_dir() -> Path:
  """The Hugging Face hub cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`), read at call time."""
  from huggingface_hub import constants
  return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
  from huggingface_hub import constants
  return bool(constants.HF_HUB_OFFLINE)


def fetch(name: str) -> Path:
  """The local file of the registered weights `<model>.<tag>`, downloaded if the cache lacks it
  (a sharded checkpoint's index: with its shards beside it). Offline and not cached: one
  ValueError naming the file and how to get it."""
  cfg = registry.pretrained_cfg(name)
  if cfg.hf_hub_id:
    path = fetch_hub_file(cfg.hf_hub_id, cfg.filename, name)
  else:
    path = url_download_path(cfg)
    if not path.is_file():
      _download(name, cfg.url, path)
  if cfg.sha256:
    check_sha256(path, cfg.sha256)
  return path


def fetch_hub_file(repo_id: str, filename: str, name: str | None = None) -> Path:
  """A file of a hub repo, and the shards a `*.index.json` lists."""
  name = name or f"hf-hub:{repo_id}"
  path = _from_hub(name, repo_id, filename)
  if filename.endswith(".index.json"):
    for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
      _from_hub(name, repo_id, shard)
  return path


def _from_hub(name: str, repo_id: str, filename: str) -> Path:
  from huggingface_hub import errors, hf_hub_download
  try:
    return Path(hf_hub_download(repo_id, filename))
  except errors.LocalEntryNotFoundError:  # offline or the hub unreachable, and not cached
    raise ValueError(
        f"{name}: {repo_id}/{filename} is not in the Hugging Face cache ({cache_dir()}) and the "
        f"hub cannot be reached{' (HF_HUB_OFFLINE=1)' if _offline() else ''}; download it where "
        f"there is a network with `hf download {repo_id} {filename}` (the same HF_HOME), or pass "
        f"the file's path as pretrained=") from None
  except errors.RepositoryNotFoundError:
    raise ValueError(f"{name}: no hub repository {repo_id!r} (private repos need `hf auth "
                     f"login` or HF_TOKEN)") from None
  except errors.EntryNotFoundError:
    raise ValueError(f"{name}: the hub repository {repo_id!r} has no file {filename!r}") from None


def url_download_path(cfg: registry.PretrainedCfg) -> Path:
  """Where the file of weights released at a URL lives in the cache."""
  return cache_dir() / "zoo-downloads" / hashlib.sha256(cfg.url.encode()).hexdigest()[:16] / \
      cfg.filename


def _download(name: str, url: str, path: Path) -> None:
  if _offline():
    raise ValueError(f"{name}: {path.name} is not in {path.parent} and HF_HUB_OFFLINE=1; "
                     f"download {url} there where there is a network, or pass the file's path "
                     f"as pretrained=")
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".incomplete")
  _log.warning("downloading %s from %s", name, url)
  try:
    urllib.request.urlretrieve(url, partial)
  except OSError as e:
    raise ValueError(f"{name}: cannot download {url} ({e}); download it to {path} by hand, or "
                     f"pass the file's path as pretrained=") from None
  partial.replace(path)  # whole files only: a cut download leaves nothing under the real name


def check_sha256(path: Path, expected: str) -> None:
  """Raises a ValueError naming the file when its sha256 is not the published one."""
  stat = Path(path).stat()
  actual = _sha256(Path(os.path.realpath(path)), stat.st_size, stat.st_mtime_ns)
  if actual != expected:
    raise ValueError(f"{path}: sha256 {actual}, expected the published {expected}; the file is "
                     f"damaged or not the release: delete it and fetch it again")


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
  """A file's sha256, once a process for each version of it (size and mtime are the key)."""
  del size, mtime_ns
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def converted_weights(path: Path, family: str) -> dict[str, np.ndarray]:
  """The zoo's weights ('/'-joined param paths -> arrays) of an official file: from the converted
  copy when there is one, else converted now and stored."""
  stored = _converted_path(path, family)
  if stored.is_file():
    try:
      return read_weights(stored)
    except ValueError as e:  # a damaged copy is only a cache: convert again
      _log.warning("%s; converting %s again", e, path)
  from models import convert
  params, _, _ = convert.get_converter(family)(convert.read_state_dict(path))
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  stored.parent.mkdir(parents=True, exist_ok=True)
  write_weights(stored.with_suffix(".incomplete"), flat, {"family": family, "source": str(path)})
  stored.with_suffix(".incomplete").replace(stored)
  return flat


def _converted_path(path: Path, family: str) -> Path:
  """Where the converted copy of `path` lives: keyed by the file (its real path, size and mtime:
  no hashing of a large file on each load) and by the family module's source (a converter that
  changes converts again)."""
  real = Path(os.path.realpath(path))
  stat = real.stat()
  module = Path(importlib.import_module(f"models.{family}").__file__).read_bytes()
  key = hashlib.sha256(f"{real}|{stat.st_size}|{stat.st_mtime_ns}|{family}|".encode()
                       + hashlib.sha256(module).digest()).hexdigest()[:32]
  return cache_dir() / "zoo-converted" / f"{family}-{key}.safetensors"


def flatten(tree: Mapping) -> dict[str, np.ndarray]:
  """A nested dict of arrays (list indices as ints or strings) -> {'a/0/c': array}; a flat one
  stays as it is."""
  from flax import traverse_util
  return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def write_weights(path: Path, flat: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
  """The zoo's weights as safetensors, marked as the zoo's layout in the metadata."""
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(path),
            metadata={"format": ZOO_FORMAT, **metadata})


def read_weights(path: Path) -> dict[str, np.ndarray]:
  """Weights `write_weights` wrote, memory-mapped."""
  with _open_safetensors(path) as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def is_zoo_weights(path) -> bool:
  """Whether a .safetensors file holds weights in the zoo's layout (not an official file)."""
  with _open_safetensors(path) as f:
    return (f.metadata() or {}).get("format") == ZOO_FORMAT


@contextlib.contextmanager
def _open_safetensors(path):
  """safetensors' reader, a damaged file refused with its name."""
  from safetensors import SafetensorError, safe_open
  try:
    with safe_open(str(path), framework="numpy") as f:
      yield f
  except SafetensorError as e:
    raise ValueError(f"{path} is not a readable .safetensors file ({e}); a download or write cut "
                     f"short: delete it and fetch it again") from None
