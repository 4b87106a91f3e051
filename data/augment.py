"""Image-classification preprocessing set by `config.input` (keys documented in configs/common.py).

Training, per image (uint8, any size):
  channels (grey -> RGB or RGB -> grey) -> random resized crop to `image_size` (or the eval crop, or
  a plain resize) -> horizontal flip -> RandAugment -> pixel / pixel_max -> (x - mean) / std.
Training, per batch: Mixup or CutMix of the batch with its reverse (timm's 'batch' mode: one mixing
  weight per batch) and label smoothing; the batch then has 'soft_label' [B, num_classes] float32
  (each row sums to 1) besides the hard 'label', which the task keeps for accuracy.
Evaluation, per image: channels -> resize the short side to floor(image_size / crop_pct) (both
  sides, `crop_mode="squash"`) -> center crop image_size x image_size -> normalise (timm's eval
  transform, with torchvision's rounding). `eval_transform(models.resolve_data_config(model))` is
  the one pretrained weights were evaluated with.
`image_size = 0` serves images at their stored size; with the defaults a batch is exactly the
stored pixels / pixel_max, as before any augmentation existed.

The crop geometry follows torchvision's RandomResizedCrop (10 tries, then the central crop at the
nearest allowed aspect ratio) and Mixup/CutMix follow timm's `Mixup` (CutMix box clipped to the
image, its weight corrected to the pasted area). Mixing happens on the normalised floats, which is
the same as mixing pixels since normalisation is affine.

Determinism: image k of global batch `step` draws all of its randomness from
`SeedSequence(seed, spawn_key=(AUGMENT, step, k))` and the batch's mixing from
`SeedSequence(seed, spawn_key=(MIX, step))`. A batch is thus a function of (seed, step) alone: a
resumed run (grain checkpoints the step) sees the same batches, and an image's augmentation does not
depend on how many processes share the batch. (Mixing pairs each process's slice with its own
reverse, as timm does per device.)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
from PIL import Image

from data.errors import DataError
from data.randaugment import OPS, RandAugment

_AUGMENT, _MIX = 1, 2   # spawn-key tags: the per-image and per-batch random streams
TRAIN_CROPS = ("random_resized", "center", "resize")
CROP_MODES = ("center", "squash")
INTERPOLATIONS = {name: getattr(Image.Resampling, name.upper())
                  for name in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")}


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """`config.input`'s image keys, checked; built by `from_config`."""
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  interpolation: str
  crop_pct: float
  crop_mode: str
  train_crop: str
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  hflip: float
  randaugment: RandAugment | None
  mixup_alpha: float
  cutmix_alpha: float
  mix_switch_prob: float
  mix_prob: float
  label_smoothing: float

  @classmethod
  def from_config(cls, input_config: Mapping[str, Any]) -> ImageOptions:
    ra, mix = input_config["randaugment"], input_config["mixup"]
    unknown = sorted(set(ra["exclude_ops"]) - set(OPS))
    if unknown:
      raise ValueError(f"config.input.randaugment.exclude_ops has unknown ops {unknown}; "
                       f"known: {OPS}")
    randaugment = None
    if ra["num_layers"]:
      randaugment = RandAugment(
          num_layers=int(ra["num_layers"]), magnitude=float(ra["magnitude"]),
          magnitude_std=float(ra["magnitude_std"]), prob=float(ra["prob"]),
          increasing=bool(ra["increasing"]),
          ops=tuple(op for op in OPS if op not in set(ra["exclude_ops"])))
    options = cls(
        image_size=int(input_config["image_size"]), channels=int(input_config["channels"]),
        mean=tuple(float(m) for m in input_config["mean"]),
        std=tuple(float(s) for s in input_config["std"]),
        interpolation=str(input_config["interpolation"]), crop_pct=float(input_config["crop_pct"]),
        crop_mode=str(input_config["crop_mode"]), train_crop=str(input_config["train_crop"]),
        crop_scale=tuple(float(s) for s in input_config["crop_scale"]),
        crop_ratio=tuple(float(r) for r in input_config["crop_ratio"]),
        hflip=float(input_config["hflip"]), randaugment=randaugment,
        mixup_alpha=float(mix["mixup_alpha"]), cutmix_alpha=float(mix["cutmix_alpha"]),
        mix_switch_prob=float(mix["switch_prob"]), mix_prob=float(mix["prob"]),
        label_smoothing=float(input_config["label_smoothing"]))
    options.validate()
    return options

  def validate(self) -> None:
    problems = []
    if self.image_size < 0:
      problems.append(f"image_size must be >= 0 (0 = as stored), got {self.image_size}")
    if self.channels not in (0, 1, 3):
      problems.append(f"channels must be 0 (as stored), 1 or 3, got {self.channels}")
    if not self.mean or not self.std or len(self.mean) != len(self.std) or min(self.std) <= 0:
      problems.append(f"mean and std need the same length (1 or one per channel) and std > 0, got "
                      f"{self.mean} and {self.std}")
    if self.interpolation not in INTERPOLATIONS:
      problems.append(f"interpolation must be one of {sorted(INTERPOLATIONS)}, "
                      f"got {self.interpolation!r}")
    if not 0 < self.crop_pct <= 1:
      problems.append(f"crop_pct must be in (0, 1], got {self.crop_pct}")
    if self.crop_mode not in CROP_MODES:
      problems.append(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
    if self.train_crop not in TRAIN_CROPS:
      problems.append(f"train_crop must be one of {TRAIN_CROPS}, got {self.train_crop!r}")
    if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
      problems.append(f"crop_scale must be (low, high) with 0 < low <= high <= 1, "
                      f"got {self.crop_scale}")
    if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
      problems.append(f"crop_ratio must be (low, high) with 0 < low <= high, got {self.crop_ratio}")
    for name, p in (("hflip", self.hflip), ("mixup.switch_prob", self.mix_switch_prob),
                    ("mixup.prob", self.mix_prob)):
      if not 0 <= p <= 1:
        problems.append(f"{name} is a probability, got {p}")
    if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
      problems.append(f"mixup alphas must be >= 0, got {self.mixup_alpha} and {self.cutmix_alpha}")
    if not 0 <= self.label_smoothing < 1:
      problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if problems:
      raise ValueError("config.input: " + "; ".join(problems))

  @property
  def mixes(self) -> bool:
    return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

  @property
  def soft_labels(self) -> bool:
    return self.mixes or self.label_smoothing > 0

  def is_identity(self, train: bool) -> bool:
    """True when a batch is just the stored pixels / pixel_max (the vectorised fast path)."""
    plain = (self.image_size == 0 and self.channels == 0 and set(self.mean) == {0.0}
             and set(self.std) == {1.0})
    return plain and not (train and (self.hflip or self.randaugment or self.soft_labels))


# ----------------------------------------------------------------------------- geometry

def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float], ratio: tuple[float, float]
                            ) -> tuple[int, int, int, int]:
  """(top, left, crop height, crop width): torchvision's RandomResizedCrop.get_params, numpy RNG.

  Up to 10 draws of an area fraction ~ U(scale) and an aspect ratio (w/h) ~ logU(ratio); the first
  box that fits is placed uniformly. Otherwise the whole image, cut centrally to the nearest ratio.
  """
  area, log_ratio = height * width, (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
      return int(top), int(left), crop_h, crop_w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    crop_w, crop_h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    crop_w, crop_h = int(round(height * ratio[1])), height
  else:
    crop_w, crop_h = width, height
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def eval_geometry(height: int, width: int, image_size: int, crop_pct: float,
                  squash: bool = False) -> tuple[tuple[int, int], tuple[int, int]]:
  """((resized height, width), (crop top, left)) of the eval transform.

  The short side becomes floor(image_size / crop_pct) and the long side keeps the aspect ratio
  (truncated, as torchvision's Resize), or both sides become it (`squash`, timm's crop_mode); the
  crop is centred with torchvision's offsets (Python's round, half to even).
  """
  short = math.floor(image_size / crop_pct)
  if squash:
    resized = (short, short)
  elif width <= height:
    resized = (int(short * height / width), short)
  else:
    resized = (short, int(short * width / height))
  top, left = (int(round((side - image_size) / 2.0)) for side in resized)
  return resized, (top, left)


# ----------------------------------------------------------------------------- per image

def _to_pil(image: np.ndarray, channels: int) -> Image.Image:
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
    raise DataError(f"expected a uint8 image [H, W, 1 or 3], got {image.dtype} {image.shape}")
  if image.shape[-1] == 1:
    pil = Image.fromarray(image[..., 0], "L")
  else:
    pil = Image.fromarray(image, "RGB")
  if channels == 3 and pil.mode != "RGB":
    return pil.convert("RGB")
  if channels == 1 and pil.mode != "L":
    return pil.convert("L")   # ITU-R 601-2 luma, as PIL and torchvision's Grayscale
  return pil


def _normalize(pil: Image.Image, pixel_max: int, options: ImageOptions) -> np.ndarray:
  pixels = np.asarray(pil, dtype=np.float32)
  pixels = pixels[..., None] if pixels.ndim == 2 else pixels
  mean, std = np.float32(options.mean), np.float32(options.std)
  return (pixels / np.float32(pixel_max) - mean) / std


def train_image(image: np.ndarray, rng: np.random.Generator, pixel_max: int,
                options: ImageOptions) -> np.ndarray:
  """One training image: uint8 [H, W, C] -> float32 [S, S, C'] (see the module docstring)."""
  pil = _to_pil(image, options.channels)
  if options.image_size:
    if options.train_crop == "random_resized":
      top, left, height, width = random_resized_crop_box(
          rng, pil.height, pil.width, options.crop_scale, options.crop_ratio)
      pil = pil.crop((left, top, left + width, top + height))
      pil = pil.resize((options.image_size,) * 2, INTERPOLATIONS[options.interpolation])
    elif options.train_crop == "resize":
      pil = pil.resize((options.image_size,) * 2, INTERPOLATIONS[options.interpolation])
    else:
      pil = _center_crop(pil, options)
  if options.hflip and rng.random() < options.hflip:
    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if options.randaugment:
    pil = options.randaugment(pil, rng)
  return _normalize(pil, pixel_max, options)


def _center_crop(pil: Image.Image, options: ImageOptions) -> Image.Image:
  (height, width), (top, left) = eval_geometry(pil.height, pil.width, options.image_size,
                                               options.crop_pct, options.crop_mode == "squash")
  pil = pil.resize((width, height), INTERPOLATIONS[options.interpolation])
  return pil.crop((left, top, left + options.image_size, top + options.image_size))


def eval_image(image: np.ndarray, pixel_max: int, options: ImageOptions) -> np.ndarray:
  """One evaluation image: uint8 [H, W, C] -> float32 [S, S, C'], deterministic."""
  pil = _to_pil(image, options.channels)
  if options.image_size:
    pil = _center_crop(pil, options)
  return _normalize(pil, pixel_max, options)


def eval_transform(data_config: Mapping[str, Any], pixel_max: int = 255):
  """The evaluation transform of a data config (`models.resolve_data_config`): uint8 [H, W, C] ->
  float32 [S, S, C] normalised, as the weights were evaluated."""
  channels, size, _ = data_config["input_size"]
  options = ImageOptions(
      image_size=size, channels=channels, mean=tuple(data_config["mean"]),
      std=tuple(data_config["std"]), interpolation=data_config["interpolation"],
      crop_pct=data_config["crop_pct"], crop_mode=data_config["crop_mode"],
      train_crop="center", crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0,
      randaugment=None, mixup_alpha=0.0, cutmix_alpha=0.0, mix_switch_prob=0.0, mix_prob=0.0,
      label_smoothing=0.0)
  options.validate()
  return lambda image: eval_image(image, pixel_max, options)


# ----------------------------------------------------------------------------- per batch

def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
  """One-hot rows with `smoothing` spread evenly: on = 1 - s + s/K, off = s/K (timm, optax)."""
  off = smoothing / num_classes
  targets = np.full((len(labels), num_classes), off, np.float32)
  targets[np.arange(len(labels)), labels] = 1.0 - smoothing + off
  return targets


def cutmix_box(rng: np.random.Generator, height: int, width: int,
               lam: float) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) of a box of about (1 - lam) of the area, centred uniformly, then
  clipped to the image."""
  cut = math.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * cut), int(width * cut)
  center_y, center_x = int(rng.integers(height)), int(rng.integers(width))
  top, bottom = np.clip([center_y - cut_h // 2, center_y + cut_h // 2], 0, height)
  left, right = np.clip([center_x - cut_w // 2, center_x + cut_w // 2], 0, width)
  return int(top), int(bottom), int(left), int(right)


def mix_batch(images: np.ndarray, labels: np.ndarray, num_classes: int, rng: np.random.Generator,
              options: ImageOptions) -> tuple[np.ndarray, np.ndarray]:
  """(mixed images, soft labels): timm's Mixup in 'batch' mode, partner = the reversed batch.

  With probability mix_prob the batch is mixed: CutMix with probability switch_prob when both alphas
  are set (else whichever is set), its weight lam ~ Beta(alpha, alpha); soft labels are
  lam * smooth(y) + (1 - lam) * smooth(reversed y).
  """
  lam, use_cutmix = 1.0, False
  if options.mixes and rng.random() < options.mix_prob:
    if options.mixup_alpha > 0 and options.cutmix_alpha > 0:
      use_cutmix = bool(rng.random() < options.mix_switch_prob)
    else:
      use_cutmix = options.cutmix_alpha > 0
    alpha = options.cutmix_alpha if use_cutmix else options.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
  partner = images[::-1]
  if use_cutmix:
    top, bottom, left, right = cutmix_box(rng, images.shape[1], images.shape[2], lam)
    images = images.copy()
    images[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (images.shape[1] * images.shape[2])
  elif lam < 1.0:
    images = lam * images + (1.0 - lam) * partner
  targets = smooth_one_hot(labels, num_classes, options.label_smoothing)
  return images.astype(np.float32), (lam * targets + (1.0 - lam) * targets[::-1]).astype(np.float32)


# ----------------------------------------------------------------------------- batch functions

def _stack(images: list[np.ndarray]) -> np.ndarray:
  shapes = {image.shape for image in images}
  if len(shapes) > 1:
    raise DataError(f"images of different shapes {sorted(shapes)[:3]} cannot form a batch: set "
                    "config.input.image_size to crop and resize them")
  return np.stack(images)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainBatch:
  """(step, indices of this process's slice) -> augmented batch; a function of (seed, step) only."""
  split: Any             # an image split: read(idx) -> (uint8 images, labels), pixel_max, meta
  options: ImageOptions
  seed: int
  first_position: int    # position of this process's first example in the global batch

  def __call__(self, step: int, indices: np.ndarray) -> dict[str, np.ndarray]:
    images, labels = self.split.read(indices)
    step = int(step)
    out = _stack([train_image(image, _rng(self.seed, _AUGMENT, step, self.first_position + k),
                              self.split.pixel_max, self.options)
                  for k, image in enumerate(images)])
    batch = {"image": out, "label": labels}
    if self.options.soft_labels:
      batch["image"], batch["soft_label"] = mix_batch(out, labels, self.split.meta["num_classes"],
                                                      _rng(self.seed, _MIX, step), self.options)
    return batch


@dataclasses.dataclass(frozen=True, eq=False)
class EvalBatch:
  """indices -> evaluation batch (resize + center crop, no randomness)."""
  split: Any
  options: ImageOptions

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    images, labels = self.split.read(indices)
    pixel_max = self.split.pixel_max
    return {"image": _stack([eval_image(image, pixel_max, self.options) for image in images]),
            "label": labels}


def _rng(seed: int, *key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
