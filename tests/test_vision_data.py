"""Image classification data: augmentation (data/augment.py, data/randaugment.py), soft-label loss,
and the encoded-image builders (image folder, ImageNet) on tiny synthetic trees and tars."""
from __future__ import annotations

import io
import json
import math
import pathlib
import tarfile

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from PIL import Image, ImageOps

import data
import train
from configs import common, itransformer as itransformer_config
from data import augment, builders, image_files, prepare, randaugment
from data.splits import ClassificationSplit
from tasks.classification import Classification

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def input_config(**keys):
  """configs.common's config.input with `keys` set (dotted names for the nested sections)."""
  config = common.base_config().input
  for key, value in keys.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


AUGMENTED = {"image_size": 32, "channels": 3, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
             "crop_scale": (0.35, 1.0), "hflip": 0.5, "randaugment.num_layers": 2,
             "randaugment.magnitude": 9.0, "randaugment.magnitude_std": 0.5,
             "mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0, "label_smoothing": 0.1}


@pytest.fixture(scope="module")
def grey_split() -> ClassificationSplit:
  """40 random 28x28 grey images, labels 0..9 (Fashion-MNIST-like, in memory)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
  meta = {"num_classes": 10, "image_shape": (28, 28, 1)}
  return ClassificationSplit(images, np.arange(40) % 10, 255, meta)


# ----------------------------------------------------------------------------- training batches

def test_augmented_batch_shapes_dtypes_and_ranges(grey_split):
  batches = data.train_batches(grey_split, 16, seed=0, input_config=input_config(**AUGMENTED))
  low = (0 - np.array(IMAGENET_MEAN)) / IMAGENET_STD
  high = (1 - np.array(IMAGENET_MEAN)) / IMAGENET_STD
  for step in range(3):
    batch = batches[step]
    assert batch.keys() == {"image", "label", "soft_label"}
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
    assert batch["soft_label"].shape == (16, 10) and batch["soft_label"].dtype == np.float32
    assert np.all(batch["image"] >= low - 1e-5) and np.all(batch["image"] <= high + 1e-5)
    np.testing.assert_allclose(batch["soft_label"].sum(1), 1.0, atol=1e-6)
    assert batch["soft_label"].min() >= 0.1 / 10 - 1e-7   # label smoothing leaves no zero target
    # Grey expanded to RGB: channels equal before normalisation.
    pixels = batch["image"] * IMAGENET_STD + IMAGENET_MEAN
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)


def test_default_input_config_serves_stored_pixels(grey_split):
  """The defaults keep the vectorised gather: what the digits quick start was trained on."""
  batch = data.train_batches(grey_split, 8, seed=3, input_config=input_config())[0]
  expected = grey_split.gather(np.random.default_rng([3, 0]).permutation(40)[:8])
  assert batch.keys() == {"image", "label"}
  np.testing.assert_array_equal(batch["image"], expected["image"])
  batch = data.eval_batches(grey_split, 16, input_config=input_config())[2]
  np.testing.assert_array_equal(batch["image"][:8], grey_split.gather(np.arange(32, 40))["image"])


def test_augmentation_is_a_function_of_seed_and_step(grey_split):
  config = input_config(**AUGMENTED)
  first, again = (data.train_batches(grey_split, 16, seed=0, input_config=config) for _ in range(2))
  other_seed = data.train_batches(grey_split, 16, seed=1, input_config=config)
  for step in (0, 5):
    for key in ("image", "soft_label", "label"):
      np.testing.assert_array_equal(first[step][key], again[step][key])
  assert not np.allclose(first[0]["image"], first[1]["image"])
  assert not np.allclose(first[0]["image"], other_seed[0]["image"])


def test_per_image_augmentation_does_not_depend_on_the_process_count(grey_split):
  config = input_config(**{**AUGMENTED, "mixup.mixup_alpha": 0.0, "mixup.cutmix_alpha": 0.0})
  whole = data.train_batches(grey_split, 16, seed=2, input_config=config)
  halves = [data.train_batches(grey_split, 16, seed=2, input_config=config, process_index=p,
                               process_count=2) for p in range(2)]
  for step in (0, 3):
    for key in ("image", "soft_label"):
      np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]),
                                    whole[step][key])


def test_resumed_iterator_gives_the_same_next_batch(grey_split, tmp_path):
  config = input_config(**AUGMENTED)
  iterator = iter(data.train_batches(grey_split, 16, seed=0, input_config=config).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
  for _ in range(3):
    next(iterator)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path),
                                            args=grain.checkpoint.CheckpointSave(iterator))
  expected = next(iterator)
  fresh = iter(data.train_batches(grey_split, 16, seed=0, input_config=config))
  restored = grain.checkpoint.CheckpointHandler().restore(
      epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(fresh))
  batch = next(restored)
  for key in expected:
    np.testing.assert_array_equal(batch[key], expected[key])


def test_mixup_mixes_images_and_labels_with_one_weight(grey_split):
  plain = data.train_batches(grey_split, 10, seed=4, input_config=input_config(image_size=16))
  mixed = data.train_batches(grey_split, 10, seed=4, input_config=input_config(
      image_size=16, **{"mixup.mixup_alpha": 1.0}))
  for step in range(3):
    x, batch = plain[step], mixed[step]
    k = int(np.flatnonzero(x["label"] != x["label"][::-1])[0])   # lam shows where the pair differs
    lam = batch["soft_label"][k, x["label"][k]]
    assert 0 < lam < 1
    np.testing.assert_allclose(batch["image"], lam * x["image"] + (1 - lam) * x["image"][::-1],
                               atol=1e-6)
    expected = lam * np.eye(10)[x["label"]] + (1 - lam) * np.eye(10)[x["label"][::-1]]
    np.testing.assert_allclose(batch["soft_label"], expected, atol=1e-6)


def test_cutmix_pastes_one_box_and_weighs_labels_by_its_area(grey_split):
  plain = data.train_batches(grey_split, 10, seed=5, input_config=input_config(image_size=20))
  mixed = data.train_batches(grey_split, 10, seed=5, input_config=input_config(
      image_size=20, **{"mixup.cutmix_alpha": 1.0}))
  areas = []
  for step in range(6):
    x, batch = plain[step], mixed[step]
    changed = np.any(batch["image"] != x["image"], axis=(0, 3))
    rows, cols = np.nonzero(changed)
    area = int(changed.sum())
    if area:   # one rectangle, every image's box taken from its partner in the reversed batch
      assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
      np.testing.assert_array_equal(batch["image"][:, changed], x["image"][::-1][:, changed])
    lam = 1 - area / 400
    expected = lam * np.eye(10)[x["label"]] + (1 - lam) * np.eye(10)[x["label"][::-1]]
    np.testing.assert_allclose(batch["soft_label"], expected, atol=1e-6)
    areas.append(area)
  assert len(set(areas)) > 2   # the box size varies with lam ~ Beta(1, 1)


def test_smooth_one_hot_numbers():
  targets = augment.smooth_one_hot(np.array([2, 0]), 4, 0.2)
  np.testing.assert_allclose(targets, [[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]],
                             atol=1e-7)


def test_label_smoothing_loss_by_hand():
  """Cross-entropy of logits (2, 1, 0) with label 0 smoothed by 0.1 over 3 classes, written out."""
  logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 0.5]], np.float32)
  labels = np.array([0, 2], np.int32)

  class FixedLogits:
    def __call__(self, images, train):
      return jnp.asarray(logits)

  batch = {"image": np.zeros((2, 1, 1, 1), np.float32), "label": labels,
           "soft_label": augment.smooth_one_hot(labels, 3, 0.1)}
  loss, aux = Classification().loss(FixedLogits(), batch)
  log_z = [math.log(math.exp(2) + math.exp(1) + 1), math.log(1 + math.exp(3) + math.exp(0.5))]
  on, off = 0.9 + 0.1 / 3, 0.1 / 3
  first = -(on * (2 - log_z[0]) + off * (1 - log_z[0]) + off * (0 - log_z[0]))
  second = -(off * (0 - log_z[1]) + off * (3 - log_z[1]) + on * (0.5 - log_z[1]))
  np.testing.assert_allclose(float(loss), (first + second) / 2, rtol=1e-6)
  assert float(aux["accuracy"]) == 0.5   # hard labels: row 0 right, row 1 wrong
  del batch["soft_label"]
  hard, _ = Classification().loss(FixedLogits(), batch)
  np.testing.assert_allclose(float(hard), ((log_z[0] - 2) + (log_z[1] - 0.5)) / 2, rtol=1e-6)


# ----------------------------------------------------------------------------- geometry

def test_eval_center_crop_geometry_by_hand():
  # 60x100 -> short side floor(32 / 0.875) = 36, long int(36 * 100 / 60) = 60;
  # offsets (36 - 32) / 2 and (60 - 32) / 2.
  assert augment.eval_geometry(60, 100, 32, 0.875) == ((36, 60), (2, 14))
  # Portrait 100x61 at crop_pct 1: 52x32, offset round(10.0) = 10; odd margins round half to even.
  assert augment.eval_geometry(100, 61, 32, 1.0) == ((52, 32), (10, 0))
  assert augment.eval_geometry(33, 50, 32, 1.0) == ((32, 48), (0, 8))
  assert augment.eval_geometry(36, 33, 33, 1.0) == ((36, 33), (2, 0))   # (36 - 33) / 2 = 1.5 -> 2
  # timm's "squash": both sides to floor(32 / crop_pct), whatever the aspect, then the center.
  assert augment.eval_geometry(60, 100, 32, 1.0, squash=True) == ((32, 32), (0, 0))
  assert augment.eval_geometry(60, 100, 32, 0.875, squash=True) == ((36, 36), (2, 2))


def test_eval_transform_of_a_data_config_squashes():
  """`eval_transform(models.resolve_data_config(...))`: a 384 squash config turns a 20x40 image
  into the 384x384 resize of the whole image, normalised with the config's mean and std."""
  image = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
  config = dict(input_size=(3, 384, 384), interpolation="bicubic", mean=(0.5, 0.5, 0.5),
                std=(0.5, 0.5, 0.5), crop_pct=1.0, crop_mode="squash")
  got = augment.eval_transform(config)(image)
  want = np.asarray(Image.fromarray(image).resize((384, 384), Image.Resampling.BICUBIC),
                    np.float32) / 255
  np.testing.assert_allclose(got, (want - 0.5) / 0.5, atol=1e-6)


def test_imagenet_class_names_follow_the_label_order():
  lines = (pathlib.Path(image_files.__file__).parent / "imagenet_class_names.txt").read_text().splitlines()
  assert tuple(line.split("\t")[0] for line in lines) == image_files.imagenet_wnids()
  names = image_files.imagenet_class_names()
  assert len(names) == 1000 and names[0] == "tench, Tinca tinca"
  assert names[207] == "golden retriever"


def test_eval_image_pixels_by_hand():
  """64x128 image whose pixels hold their coordinates; image_size 16, crop_pct 0.5, nearest filter:
  resize to 32x64 (pixel i reads source 2i+1), crop at (8, 24): output (i, j) = source
  (2(8+i)+1, 2(24+j)+1)."""
  rows, cols = np.mgrid[:64, :128]
  source = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
  options = augment.ImageOptions.from_config(
      input_config(image_size=16, crop_pct=0.5, interpolation="nearest"))
  out = augment.eval_image(source, 1, options)
  i, j = np.mgrid[:16, :16]
  np.testing.assert_array_equal(out[..., 0], 2 * (8 + i) + 1)
  np.testing.assert_array_equal(out[..., 1], 2 * (24 + j) + 1)


def test_random_resized_crop_boxes_respect_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(300):
    height, width = (int(v) for v in rng.integers(20, 200, 2))
    top, left, h, w = augment.random_resized_crop_box(rng, height, width, (0.08, 1.0),
                                                      (3 / 4, 4 / 3))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
  # A ratio no draw can meet on a square image: the central crop at the nearest ratio (w/h = 3).
  assert augment.random_resized_crop_box(rng, 90, 90, (0.9, 1.0), (3.0, 4.0)) == (30, 0, 30, 90)
  _, _, h, w = augment.random_resized_crop_box(rng, 100, 100, (0.25, 0.25), (1.0, 1.0))
  assert h == w == 50


def test_randaugment_ops_keep_size_and_mode():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
  for mode in ("RGB", "L"):
    image = Image.fromarray(pixels).convert(mode)
    for name in randaugment.OPS:
      for magnitude, increasing in ((0.0, False), (9.0, True), (15.0, False)):
        out = randaugment.apply_op(name, image, magnitude, rng, increasing)
        assert out.size == image.size and out.mode == mode, name


def test_randaugment_histogram_ops_match_pil():
  """AutoContrast, Equalize and Invert re-written in numpy equal PIL's ImageOps pixel for pixel."""
  rng = np.random.default_rng(0)
  cases = [rng.integers(0, 256, (17, 23, 3)), rng.integers(50, 60, (9, 9, 3)),
           np.full((5, 6, 3), 7), rng.integers(0, 3, (8, 8, 3)) * 100]
  for pixels in cases:
    for mode in ("RGB", "L"):
      image = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
      for name, reference in (("AutoContrast", ImageOps.autocontrast),
                              ("Equalize", ImageOps.equalize), ("Invert", ImageOps.invert)):
        np.testing.assert_array_equal(np.asarray(randaugment.apply_op(name, image, 5.0, rng)),
                                      np.asarray(reference(image)))


def test_randaugment_level_numbers():
  ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
  rng = np.random.default_rng(0)
  values = np.arange(256)

  def pixels(name, magnitude, increasing=False):
    return np.asarray(randaugment.apply_op(name, ramp, magnitude, rng, increasing)).ravel()

  two_bits = values & 0b11000000
  np.testing.assert_array_equal(pixels("Posterize", 5.0), two_bits)          # int(0.5 * 4) = 2 bits
  np.testing.assert_array_equal(pixels("Posterize", 5.0, True), two_bits)    # 4 - 2 bits
  np.testing.assert_array_equal(pixels("Posterize", 0.0), 0)            # 0 bits: black, as TF
  solarized = np.where(values >= 128, 255 - values, values)             # threshold int(0.5 * 256)
  np.testing.assert_array_equal(pixels("Solarize", 5.0), solarized)
  np.testing.assert_array_equal(pixels("Solarize", 5.0, True), solarized)   # 256 - 128
  np.testing.assert_array_equal(pixels("SolarizeAdd", 10.0),
                                np.where(values < 128, np.minimum(values + 110, 255), values))


def test_bad_input_config_is_refused(grey_split):
  with pytest.raises(ValueError, match="crop_pct must be in"):
    data.eval_batches(grey_split, 8, input_config=input_config(image_size=8, crop_pct=1.5))
  with pytest.raises(ValueError, match="exclude_ops has unknown ops"):
    data.train_batches(grey_split, 8, 0,
                       input_config=input_config(**{"randaugment.exclude_ops": ("Cutot",)}))
  digits_like = ClassificationSplit(np.zeros((8, 8, 8, 1), np.uint8), np.arange(8), 16,
                                    {"num_classes": 8})
  with pytest.raises(ValueError, match="8-bit pixels"):
    data.train_batches(digits_like, 4, 0,
                       input_config=input_config(**{"randaugment.num_layers": 1}))


# ----------------------------------------------------------------------------- image folder

def encode(pixels: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
  buffer = io.BytesIO()
  options = {"quality": 95} if fmt == "JPEG" else {}
  Image.fromarray(pixels).convert(mode).save(buffer, format=fmt, **options)
  return buffer.getvalue()


def decoded(encoded: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def write_tree(root: pathlib.Path, layout: dict[str, dict[str, int]],
               seed: int = 0) -> dict[str, bytes]:
  """layout: split folder -> class -> number of images; alternating PNG / JPEG of random sizes."""
  rng, files = np.random.default_rng(seed), {}
  for split, classes in layout.items():
    for name, count in classes.items():
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        fmt = ("PNG", "JPEG")[i % 2]
        height, width = (int(side) for side in rng.integers(10, 30, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = root / split / name / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}"
        path.write_bytes(encode(pixels, fmt, mode="L" if i == 2 else "RGB"))
        files[str(path.relative_to(root))] = path.read_bytes()
  return files


def test_image_folder_builder(tmp_path):
  root = tmp_path / "My Flowers"
  files = write_tree(root, {"train": {"tulip": 3, "daisy": 2}, "val": {"daisy": 1, "tulip": 1},
                            "test": {"tulip": 2}})
  (root / "train" / "daisy" / "notes.txt").write_text("not an image, not listed")
  config_data = dict(name="image_folder", manual_dir=str(root), data_dir=str(tmp_path / "tfds"))
  train = data.load(config_data, "train")
  assert isinstance(train, data.EncodedImageSplit)
  assert train.meta["class_names"] == ("daisy", "tulip") and train.meta["num_classes"] == 2
  assert [len(data.load(config_data, s)) for s in ("train", "validation", "test")] == [5, 2, 2]
  images, labels = train.read(np.arange(5))
  assert labels.tolist() == [0, 0, 1, 1, 1]   # classes sorted, files sorted in each
  order = ["train/daisy/0.png", "train/daisy/1.jpg", "train/tulip/0.png", "train/tulip/1.jpg",
           "train/tulip/2.png"]
  for image, relative in zip(images, order):
    np.testing.assert_array_equal(image, decoded(files[relative]))   # stored bytes = the file's
  assert images[4].shape[-1] == 3   # a grey PNG comes back as RGB
  # Batches through the pipeline: one size after the eval crop, 'mask' on padding.
  test = data.load(config_data, "test")
  batch = data.eval_batches(test, 4, input_config=input_config(image_size=12))[0]
  assert batch["image"].shape == (4, 12, 12, 3) and batch["mask"].tolist() == [1, 1, 0, 0]
  batch = data.train_batches(train, 4, 0, input_config=input_config(**AUGMENTED))[1]
  assert batch["image"].shape == (4, 32, 32, 3) and batch["soft_label"].shape == (4, 2)
  with pytest.raises(data.DataError, match="cannot form a batch"):
    data.eval_batches(train, 4, input_config=input_config())[0]
  # Prepared once: the tree may go away and the dataset still loads by name.
  for path in sorted(root.rglob("*"), reverse=True):
    path.unlink() if path.is_file() else path.rmdir()
  assert len(data.load(config_data, "test")) == 2


def test_image_folder_validation_fraction(tmp_path):
  root = tmp_path / "shapes"
  write_tree(root, {"train": {"a": 6, "b": 4}})
  config_data = dict(name="image_folder", manual_dir=str(root), data_dir=str(tmp_path / "tfds"),
                     validation_fraction=0.3)
  train, validation = data.load(config_data, "train"), data.load(config_data, "validation")
  assert (len(train), len(validation)) == (7, 3)
  names = [r["file_name"] for r in validation.source.__getitems__(range(3))]
  everything = [f"train/{c}/{i}.{'png' if i % 2 == 0 else 'jpg'}"
                for c, n in (("a", 6), ("b", 4)) for i in range(n)]
  held_out = [everything[i] for i in sorted(np.random.default_rng(0).permutation(10)[:3])]
  assert [n.decode() if isinstance(n, bytes) else n for n in names] == held_out


def test_bad_image_folders_are_refused(tmp_path):
  def refused(root, match, **keys):
    with pytest.raises(data.DataError, match=match):
      data.load(dict(name="image_folder", manual_dir=str(root), data_dir=str(tmp_path / "tfds"),
                     **keys), "train")

  refused(tmp_path / "nothing", "has no train/ folder")
  (tmp_path / "empty" / "train").mkdir(parents=True)
  refused(tmp_path / "empty", "has no class folders")
  write_tree(tmp_path / "extra", {"train": {"a": 1}, "val": {"zebra": 1}})
  refused(tmp_path / "extra", "class folders that train/ lacks")
  write_tree(tmp_path / "both", {"train": {"a": 2}, "val": {"a": 1}})
  refused(tmp_path / "both", "has a validation folder", validation_fraction=0.5)
  write_tree(tmp_path / "small", {"train": {"a": 2}})
  refused(tmp_path / "small", "leaves an empty split", validation_fraction=0.3)   # int(0.3 * 2) = 0


def test_image_folder_refuses_a_file_that_is_no_image(tmp_path):
  root = tmp_path / "tree"
  write_tree(root, {"train": {"a": 1}})
  (root / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(data.DataError, match="broken.jpg is not a readable image"):
    builders.prepare("image_folder", str(root), str(tmp_path / "tfds"))


def test_prepare_cli_image_folder(tmp_path, capsys):
  root = tmp_path / "pets"
  write_tree(root, {"train": {"cat": 2, "dog": 2}})
  assert prepare.main(["image_folder", "--manual_dir", str(root), "--data_dir",
                       str(tmp_path / "tfds"), "--validation_fraction", "0.25"]) == 0
  assert "image_folder_pets_val0p25/1.0.0 (train 3, validation 1)" in capsys.readouterr().out
  assert prepare.main(["image_folder", "--data_dir", str(tmp_path / "tfds")]) == 2
  assert "needs the tree's root" in capsys.readouterr().err


# ----------------------------------------------------------------------------- ImageNet

VAL_WNIDS = ("n01751748", "n09193705", "n02105855")   # TFDS validation_labels.txt, lines 1-3


def tar_bytes(members: dict[str, bytes]) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as archive:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      archive.addfile(info, io.BytesIO(payload))
  return buffer.getvalue()


@pytest.fixture(scope="module")
def imagenet_files() -> dict[str, dict[str, bytes]]:
  """Two training classes of two JPEGs (one grey, one CMYK) and three validation JPEGs."""
  rng = np.random.default_rng(1)
  def image(mode="RGB"):
    return encode(rng.integers(0, 256, (int(rng.integers(8, 20)), 16, 3), dtype=np.uint8), "JPEG",
                  mode)

  train = {wnid: {f"{wnid}_{i}.JPEG": image(mode) for i, mode in enumerate(("L", "CMYK"))}
           for wnid in image_files.imagenet_wnids()[:2]}
  val = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": image() for i in range(3)}
  return {"train": train, "val": val}


def check_imagenet(config_data, imagenet_files):
  train, validation = data.load(config_data, "train"), data.load(config_data, "validation")
  assert train.meta["num_classes"] == 1000
  assert train.meta["class_names"][:2] == ("n01440764", "n01443537")
  images, labels = train.read(np.arange(4))
  assert labels.tolist() == [0, 0, 1, 1]
  expected = [payload for wnid in sorted(imagenet_files["train"])
              for _, payload in sorted(imagenet_files["train"][wnid].items())]
  for image, payload in zip(images, expected):
    assert image.ndim == 3 and image.shape[-1] == 3   # grey and CMYK decoded to RGB
    np.testing.assert_array_equal(image, decoded(payload))
  images, labels = validation.read(np.arange(3))
  class_index = {w: i for i, w in enumerate(image_files.imagenet_wnids())}
  assert labels.tolist() == [class_index[w] for w in VAL_WNIDS]
  for image, (_, payload) in zip(images, sorted(imagenet_files["val"].items())):
    np.testing.assert_array_equal(image, decoded(payload))


def test_imagenet2012_from_the_tfds_tars(tmp_path, imagenet_files):
  manual = tmp_path / "raw"
  manual.mkdir()
  train_tar = {f"{wnid}.tar": tar_bytes(files) for wnid, files in imagenet_files["train"].items()}
  (manual / image_files.IMAGENET_TRAIN_TAR).write_bytes(tar_bytes(train_tar))
  (manual / image_files.IMAGENET_VAL_TAR).write_bytes(tar_bytes(imagenet_files["val"]))
  check_imagenet(dict(name="imagenet2012", manual_dir=str(manual), data_dir=str(tmp_path / "tfds")),
                 imagenet_files)


def test_imagenet2012_from_extracted_folders(tmp_path, imagenet_files):
  manual = tmp_path / "raw"
  for wnid, files in imagenet_files["train"].items():
    (manual / "train" / wnid).mkdir(parents=True)
    for name, payload in files.items():
      (manual / "train" / wnid / name).write_bytes(payload)
  (manual / "val").mkdir()
  for name, payload in imagenet_files["val"].items():
    (manual / "val" / name).write_bytes(payload)
  check_imagenet(dict(name="imagenet2012", manual_dir=str(manual), data_dir=str(tmp_path / "tfds")),
                 imagenet_files)


def test_imagenet2012_refusals(tmp_path, imagenet_files):
  manual = tmp_path / "raw"
  a_jpeg = next(iter(imagenet_files["val"].values()))
  (manual / "train" / "n99999999").mkdir(parents=True)
  (manual / "train" / "n99999999" / "x.JPEG").write_bytes(a_jpeg)
  config_data = dict(name="imagenet2012", manual_dir=str(manual), data_dir=str(tmp_path / "tfds"))
  with pytest.raises(data.DataError, match="ILSVRC2012_img_val.tar not found"):
    data.load(config_data, "train")
  (manual / "val").mkdir()
  (manual / "val" / "holiday.JPEG").write_bytes(a_jpeg)
  with pytest.raises(data.DataError, match="not one of the 1000 ILSVRC2012 classes"):
    data.load(config_data, "train")
  with pytest.raises(data.DataError, match="prepared from your copy of ILSVRC2012"):
    builders.prepare("imagenet2012", "", str(tmp_path / "tfds"))


# ----------------------------------------------------------------------------- the shared loop

def augmented_digits_config(total_steps: int):
  """The digits quick start with crop, flip, Mixup/CutMix and label smoothing, a constant lr."""
  config = itransformer_config.get_config("digits")
  config.unlock()
  config.total_steps, config.eval_every_steps, config.log_every_steps = total_steps, 6, 1
  config.checkpoint.async_save = False
  config.early_stopping.metric, config.eval_splits = "", ()   # only the final test evaluation
  config.schedule.name, config.schedule.warmup_steps = "constant", 0
  config.input.batch_size = 32
  config.input.image_size, config.input.crop_scale, config.input.hflip = 8, (0.5, 1.0), 0.5
  config.input.mixup.mixup_alpha, config.input.mixup.cutmix_alpha = 0.8, 1.0
  config.input.label_smoothing = 0.1
  config.lock()
  return config


@pytest.mark.slow
def test_augmented_training_resumes_exactly(tmp_path):
  """Soft labels through train.py; a run stopped at step 6 and resumed equals a straight run."""
  straight = train.train_and_evaluate(augmented_digits_config(12), str(tmp_path / "straight"))
  train.train_and_evaluate(augmented_digits_config(6), str(tmp_path / "resumed"))
  resumed = train.train_and_evaluate(augmented_digits_config(12), str(tmp_path / "resumed"))
  assert resumed["steps"] == straight["steps"] == 12
  assert resumed["test/loss"] == straight["test/loss"] and np.isfinite(straight["test/loss"])
  losses = [[m["train/loss"] for m in map(json.loads, open(tmp_path / run / "metrics.jsonl"))
             if "train/loss" in m] for run in ("straight", "resumed")]
  assert losses[0] == losses[1] and len(losses[0]) == 12
