"""Grain pipelines over a split: element e of a pipeline is batch e, computed from e alone.

Index maps, not iterators with hidden state, so a grain iterator's checkpoint is just its position and
a resumed run sees the same batches as an uninterrupted one. Each process gathers only its contiguous
slice of the global batch. Image splits are preprocessed as `input_config` (config.input) says
(data.augment): random augmentation draws from (seed, step), so it resumes exactly too.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import grain
import numpy as np

from data import augment
from data.splits import ClassificationSplit, EncodedImageSplit

# "Infinite": far more steps than any run; MapDataset.range is lazy, so the size costs nothing.
_MAX_STEPS = 2**62


def steps_per_epoch(split, batch_size: int) -> int:
  """Full global batches per epoch; the last partial batch is dropped (like the official train loader)."""
  steps = len(split) // batch_size
  if steps < 1:
    raise ValueError(f"batch size {batch_size} is larger than the split ({len(split)} examples)")
  return steps


def train_batches(split, batch_size: int, seed: int, *,
                  input_config: Mapping[str, Any] | None = None, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Element e = this process's slice of global batch e (training step e).

  Epoch k = e // steps_per_epoch visits the examples in the order
  `numpy.random.default_rng([seed, k]).permutation(len(split))`; batches never cross epochs.
  `input_config` (config.input) sets the image augmentation; None = the stored images as they are.
  """
  local_batch = _local_batch_size(batch_size, process_count, process_index)
  local_start = process_index * local_batch
  indices_of_step = functools.partial(_train_indices, num_examples=len(split), batch_size=batch_size,
                                      steps=steps_per_epoch(split, batch_size), seed=seed,
                                      local_start=local_start, local_batch=local_batch)
  options = _image_options(split, input_config, train=True)
  if options is None:
    return grain.MapDataset.range(_MAX_STEPS).map(indices_of_step).map(split.gather)
  make_batch = augment.TrainBatch(split, options, seed, first_position=local_start)
  return grain.MapDataset.range(_MAX_STEPS).map(functools.partial(
      _augmented_train_batch, indices_of_step=indices_of_step, make_batch=make_batch))


def eval_batches(split, batch_size: int, *, input_config: Mapping[str, Any] | None = None,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Every example once, in order; the last global batch is padded (repeating the last example).

  Each batch has a 'mask' (float32, 1 = real example, 0 = padding), so metrics weight padding out and
  every batch has the same shape (one compilation). Images get the eval resize + center crop of
  `input_config` (config.input).
  """
  local_batch = _local_batch_size(batch_size, process_count, process_index)
  num_batches = -(-len(split) // batch_size)
  indices_of_batch = functools.partial(_eval_indices, num_examples=len(split), batch_size=batch_size,
                                       local_start=process_index * local_batch, local_batch=local_batch)
  options = _image_options(split, input_config, train=False)
  make_batch = split.gather if options is None else augment.EvalBatch(split, options)
  return grain.MapDataset.range(num_batches).map(indices_of_batch).map(
      functools.partial(_batch_with_mask, make_batch))


def _image_options(split, input_config, train: bool) -> augment.ImageOptions | None:
  """The preprocessing of an image split; None where `gather` serves the batch as it is."""
  if not isinstance(split, (ClassificationSplit, EncodedImageSplit)):
    return None
  if input_config is None:
    if isinstance(split, EncodedImageSplit):
      raise ValueError("an encoded image split needs input_config (config.input) to preprocess "
                       "its images")
    return None
  options = augment.ImageOptions.from_config(input_config)
  if isinstance(split, ClassificationSplit) and options.is_identity(train):
    return None
  if train and options.randaugment and split.pixel_max != 255:
    raise ValueError(f"RandAugment works on 8-bit pixels; this dataset's pixels go up to "
                     f"{split.pixel_max}")
  return options


def _augmented_train_batch(step: int, *, indices_of_step, make_batch) -> dict[str, np.ndarray]:
  return make_batch(step, indices_of_step(step))


def _local_batch_size(batch_size: int, process_count: int, process_index: int) -> int:
  if batch_size % process_count or not 0 <= process_index < process_count:
    raise ValueError(f"global batch {batch_size} must split evenly over {process_count} processes "
                     f"(process_index {process_index})")
  return batch_size // process_count


@functools.lru_cache(maxsize=2)   # consecutive steps share their epoch's permutation
def _epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _train_indices(step: int, *, num_examples: int, batch_size: int, steps: int, seed: int,
                   local_start: int, local_batch: int) -> np.ndarray:
  epoch, step_in_epoch = divmod(int(step), steps)
  start = step_in_epoch * batch_size + local_start
  return _epoch_order(seed, epoch, num_examples)[start:start + local_batch]


def _eval_indices(batch: int, *, num_examples: int, batch_size: int, local_start: int,
                  local_batch: int) -> tuple[np.ndarray, np.ndarray]:
  positions = int(batch) * batch_size + local_start + np.arange(local_batch)
  return np.minimum(positions, num_examples - 1), (positions < num_examples).astype(np.float32)


def _batch_with_mask(make_batch,
                     indices_and_mask: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
  indices, mask = indices_and_mask
  return {**make_batch(indices), "mask": mask}
