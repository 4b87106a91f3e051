"""Reads a PyTorch `.pth`/`.pt` file (torch.save's zip format) into numpy arrays without torch and without
running pickled code.

A torch.save archive holds `<name>/data.pkl`, a pickle that rebuilds tensors from storages kept as raw bytes in
`<name>/data/<key>`. The unpickler below resolves only the globals such a pickle of tensors needs (the tensor and
parameter rebuild functions, storage types, OrderedDict); any other global is refused before it is called.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
}


class _StorageType:
  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2: a strided view into a storage, copied out after a bounds check."""
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride) or any(s < 0 for s in (*size, *stride)) or offset < 0:
    raise ValueError(f"corrupt tensor record: size {size}, stride {stride}, offset {offset}")
  if 0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
    raise ValueError(f"corrupt tensor record: size {size}, stride {stride}, offset {offset} reach past a "
                     f"storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * storage.itemsize for s in stride])
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_unused) -> np.ndarray:
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _TensorUnpickler(pickle.Unpickler):
  def __init__(self, archive: zipfile.ZipFile, prefix: str):
    super().__init__(archive.open(f"{prefix}data.pkl"))
    self._archive = archive
    self._prefix = prefix
    self._storages: dict[str, np.ndarray] = {}
    byteorder = f"{prefix}byteorder"
    self._byteorder = (archive.read(byteorder).decode().strip() if byteorder in archive.namelist() else "little")

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED_GLOBALS:
      raise ValueError(f"refusing to unpickle {module}.{name}: a checkpoint of tensors never needs it (only "
                       f"state_dicts of tensors are read; re-save with torch.save(model.state_dict(), path))")
    return _ALLOWED_GLOBALS[(module, name)]

  def persistent_load(self, pid) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise ValueError(f"unsupported persistent id in the checkpoint: {pid!r:.200}")
    _, storage_type, key, _location, _numel = pid
    if key not in self._storages:
      storage = np.frombuffer(self._archive.read(f"{self._prefix}data/{key}"), storage_type.dtype)
      self._storages[key] = storage if self._byteorder == "little" else storage.byteswap()
    return self._storages[key]


def load(path) -> Any:
  """The object torch.save wrote to `path` (usually a dict of numpy arrays)."""
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      if f.read(4) == b"PK\x03\x04":  # a zip archive's start, without its end
        raise ValueError(f"{path} is a zip archive cut short (a download that did not finish?): "
                         f"fetch it again")
    raise ValueError(f"{path} is not a torch.save zip archive (torch >= 1.6); the legacy format is pickled "
                     f"code and is not read here; re-save it with a current torch")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}")
    try:
      return _TensorUnpickler(archive, pickles[0][:-len("data.pkl")]).load()
    except ValueError:  # the refusals of what the unpickler reads
      raise
    except Exception as e:  # noqa: BLE001 -- a malformed pickle fails in many ways
      raise ValueError(f"{path}: its data.pkl is not a readable state_dict "
                       f"({type(e).__name__}: {e})") from None
