"""RandAugment (Cubuk et al., 2019) on 8-bit PIL images, with the options timm adds.

The op set is the one of the TensorFlow reference that big_vision and the official MaxViT recipe use
(tensorflow/tpu `autoaugment.py`): 16 ops, each picked uniformly per layer, with replacement. timm's
`rand-m9-mstd0.5-inc1` is the same set without Cutout (`exclude_ops=('Cutout',)`), applied with
probability 0.5 (`prob`), a Gaussian magnitude (`magnitude_std`) and the 'increasing' variants of
Posterize, Solarize and the four enhance ops (`increasing=True`).

Why PIL (not jnp): the ops run per image in the grain input threads, on images of any size, next to
the JPEG decoding that needs PIL anyway, and off the accelerator; and PIL is what timm's reference
implementation is written with, so the enhance and histogram ops mean the same thing op for op.

Magnitudes are on the usual 0..10 scale (`strength = magnitude / 10`; more than 10 is allowed, as
MaxViT's magnitude 15). Geometry is relative to the image so that the ops make sense at 28 and at
224 pixels: a translation of up to 0.45 of the side at magnitude 10 (timm's 0.45; the TF
reference's 100 pixels at 224 is 0.446) and a Cutout square of half-side 40/224 of the short side
(TF: 40 pixels).
Rotations, shears and translations sample bilinearly and fill with grey 128, as the references do.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance

MAX_LEVEL = 10.0
FILL = 128
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
       "TranslateY", "Cutout")
_MAX_ROTATE_DEGREES, _MAX_SHEAR, _MAX_TRANSLATE, _CUTOUT_HALF_SIDE = 30.0, 0.3, 0.45, 40 / 224


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _fill(image: Image.Image) -> int | tuple[int, ...]:
  return (FILL,) * len(image.getbands()) if len(image.getbands()) > 1 else FILL


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
  """PIL's inverse map: output pixel (x, y) reads input (ax + by + c, dx + ey + f)."""
  return image.transform(image.size, Image.Transform.AFFINE, coefficients,
                         resample=Image.Resampling.BILINEAR, fillcolor=_fill(image))


_VALUES = np.arange(256)


def _lookup(image: Image.Image, tables: np.ndarray) -> Image.Image:
  """Pixel value v of channel c -> tables[c, v] (one table [256] for all channels, or one each).

  numpy, not Image.point: point() rounds its table in a Python loop, 20x the cost of the op itself.
  """
  pixels = np.asarray(image)
  tables = np.broadcast_to(np.asarray(tables, np.uint8), (len(image.getbands()), 256))
  if pixels.ndim == 2:
    return Image.fromarray(tables[0][pixels], image.mode)
  channels = [tables[c][pixels[..., c]] for c in range(pixels.shape[-1])]
  return Image.fromarray(np.stack(channels, -1), image.mode)


def _channels(image: Image.Image) -> np.ndarray:
  pixels = np.asarray(image)
  return pixels.reshape(-1, 1) if pixels.ndim == 2 else pixels.reshape(-1, pixels.shape[-1])


def _autocontrast(image, *_):
  """Each channel stretched to 0..255 (PIL ImageOps.autocontrast with no cutoff); flat ones kept."""
  tables = []
  for channel in _channels(image).T:
    low, high = int(channel.min()), int(channel.max())
    if high <= low:
      tables.append(_VALUES)
      continue
    scale = 255.0 / (high - low)
    tables.append(np.clip((_VALUES * scale - low * scale).astype(np.int64), 0, 255))
  return _lookup(image, np.stack(tables))


def _equalize(image, *_):
  """Each channel's histogram equalised, as PIL's ImageOps.equalize (last occupied bin left out)."""
  tables = []
  for channel in _channels(image).T:
    histogram = np.bincount(channel, minlength=256)
    occupied = histogram[histogram > 0]
    step = (histogram.sum() - occupied[-1]) // 255
    if not step:
      tables.append(_VALUES)
      continue
    below = np.concatenate([[0], np.cumsum(histogram)[:-1]])   # pixels darker than each value
    tables.append(np.minimum((below + step // 2) // step, 255))
  return _lookup(image, np.stack(tables))


def _posterize(image, strength, rng, increasing):
  del rng
  bits = int(strength * 4)
  bits = min(max(4 - bits if increasing else bits, 0), 8)
  mask = 0xFF & ~(2 ** (8 - bits) - 1)   # 0 bits keeps nothing (black), as the TF reference
  return _lookup(image, _VALUES & mask)


def _solarize(image, strength, rng, increasing):
  del rng
  threshold = int(strength * 256)
  threshold = 256 - threshold if increasing else threshold
  return _lookup(image, np.where(_VALUES >= threshold, 255 - _VALUES, _VALUES))


def _solarize_add(image, strength, rng, increasing):
  del rng, increasing
  addition = int(strength * 110)
  return _lookup(image, np.where(_VALUES < 128, np.minimum(_VALUES + addition, 255), _VALUES))


def _enhance(enhancer: type) -> Callable:
  def op(image, strength, rng, increasing):
    # TF: a factor in [0.1, 1.9] growing with the magnitude; timm 'inc': 1 +- 0.9 strength.
    factor = max(0.1, 1.0 + _signed(0.9 * strength, rng)) if increasing else 1.8 * strength + 0.1
    return enhancer(image).enhance(factor)
  return op


def _rotate(image, strength, rng, increasing):
  del increasing
  return image.rotate(_signed(_MAX_ROTATE_DEGREES * strength, rng),
                      resample=Image.Resampling.BILINEAR, fillcolor=_fill(image))


def _shear(axis: int) -> Callable:
  def op(image, strength, rng, increasing):
    del increasing
    shear = _signed(_MAX_SHEAR * strength, rng)
    return _affine(image, (1, shear, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, shear, 1, 0))
  return op


def _translate(axis: int) -> Callable:
  def op(image, strength, rng, increasing):
    del increasing
    shift = _signed(_MAX_TRANSLATE * strength * image.size[axis], rng)
    return _affine(image, (1, 0, shift, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, shift))
  return op


def _cutout(image, strength, rng, increasing):
  del increasing
  width, height = image.size
  half = int(round(_CUTOUT_HALF_SIDE * strength * min(width, height)))
  center_y, center_x = rng.integers(height), rng.integers(width)
  pixels = np.array(image)
  pixels[max(center_y - half, 0):center_y + half, max(center_x - half, 0):center_x + half] = FILL
  return Image.fromarray(pixels, image.mode)


_OP_FUNCTIONS: dict[str, Callable] = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": lambda image, *_: _lookup(image, 255 - _VALUES),
    "Rotate": _rotate,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear(0),
    "ShearY": _shear(1),
    "TranslateX": _translate(0),
    "TranslateY": _translate(1),
    "Cutout": _cutout,
}


def apply_op(name: str, image: Image.Image, magnitude: float, rng: np.random.Generator,
             increasing: bool = False) -> Image.Image:
  """One op at a fixed magnitude (its random sign or position drawn from `rng`)."""
  return _OP_FUNCTIONS[name](image, magnitude / MAX_LEVEL, rng, increasing)


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """`num_layers` ops per image, each picked uniformly from `ops` and applied with chance `prob`."""
  num_layers: int
  magnitude: float
  magnitude_std: float = 0.0   # > 0: an op's magnitude ~ N(magnitude, std), in [0, max(10, m)]
  prob: float = 1.0
  increasing: bool = False
  ops: tuple[str, ...] = OPS

  def __post_init__(self):
    unknown = sorted(set(self.ops) - set(OPS))
    if unknown or not self.ops:
      raise ValueError(f"RandAugment ops must be a non-empty subset of {OPS}; "
                       f"got unknown {unknown}")
    if min(self.num_layers, self.magnitude, self.magnitude_std) < 0 or not 0 <= self.prob <= 1:
      raise ValueError(f"RandAugment needs num_layers, magnitude, magnitude_std >= 0 and prob in "
                       f"[0, 1]; got {self.num_layers}, {self.magnitude}, {self.magnitude_std}, "
                       f"{self.prob}")

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    for _ in range(self.num_layers):
      name = self.ops[rng.integers(len(self.ops))]
      if rng.random() >= self.prob:
        continue
      magnitude = self.magnitude
      if self.magnitude_std > 0:
        magnitude = float(np.clip(rng.normal(magnitude, self.magnitude_std), 0,
                                  max(MAX_LEVEL, magnitude)))
      image = apply_op(name, image, magnitude, rng, self.increasing)
    return image
