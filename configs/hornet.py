r"""HorNet (NeurIPS 2022): the official ImageNet recipes of every released variant; Fashion-MNIST.

ImageNet-1K from scratch (`in1k`, the default setting; variants tiny/small/base x 7x7/gf):

  python -m data.prepare imagenet2012 --manual_dir ~/data/imagenet          # once
  python train.py --config configs/hornet.py:variant=tiny_gf --workdir runs/hornet_tiny_gf

ImageNet-22K pre-training of HorNet-L (`in22k`, on any class-per-folder copy) and its ImageNet-1K
fine-tune at 384 (`ft384`, from the 22K weights: a zoo workdir or the official .pth):

  python train.py --config configs/hornet.py:in22k,variant=large_gf --workdir runs/hornet_l_gf_22k \
      --config.data.manual_dir=~/data/imagenet22k
  python train.py --config configs/hornet.py:ft384,variant=large_gf --workdir runs/hornet_l_gf_384 \
      --config.init_from.path=runs/hornet_l_gf_22k

A small HorNet (widths 32..256, depths 1-1-3-1, 32x32 grey input) on Fashion-MNIST, for a CPU:

  python -m data.prepare fashion_mnist --manual_dir ../shared/data/fashion_mnist   # once
  python train.py --config configs/hornet.py:fashion_mnist --workdir runs/hornet_fmnist

Args: `variant=<size>_<7x7|gf>` (the model `hornet_<variant>`), `runlocal` (a few small steps: a
smoke run of any setting), `seed=N`.

The recipes are TRAINING.md's commands run through the official main.py (raoyongming/HorNet @
ac9e2105): AdamW (betas 0.9/0.999), a global batch of 4096 (per-GPU batch x update_freq x GPUs),
lr 4e-3 with linear warmup then cosine to min_lr 1e-6 per step, weight decay 0.05, 300 epochs
and 20 warmup epochs, gradient clipping and drop path per variant, RandAugment
`rand-m9-mstd0.5-inc1` (m12 for S-GF, m15 for B-GF), Mixup 0.8 / CutMix 1.0, label smoothing 0.1,
random resized crop + flip at 224 (bicubic), eval resize 256 + center crop 224.

What this loop does not do (yet) and the official runs did: an EMA of the weights (decay 0.9999,
evaluated and used for the released IN-1K checkpoints), random erasing (probability 0.25), no
weight decay on biases and other 1-D params (optax.adamw here decays every param), layer-wise lr
decay (0.7 in the 384 fine-tunes), mapping the 22K head onto the 1K classes when fine-tuning (the
head starts fresh here), and warping (not cropping) the eval images at 384. The recipes here are
otherwise the official ones; expect their accuracy without those parts to be somewhat lower.
"""
import ml_collections

from configs import common

_IMAGENET_1K_TRAIN = 1_281_167
# Warmup is given in steps, so the 22K recipe assumes the fall 2011 release's image count. The
# released 22K heads have ~10.5k classes, i.e. a filtered copy with fewer images: set
# schedule.warmup_steps = 5 epochs of steps for the copy at hand.
_IMAGENET_22K_TRAIN = 14_197_122

# variant -> (gradient clipping norm, RandAugment magnitude) of TRAINING.md's IN-1K commands.
_IN1K = {
    "tiny_7x7": (100.0, 9.0), "tiny_gf": (1.0, 9.0),
    "small_7x7": (5.0, 9.0), "small_gf": (1.0, 12.0),
    "base_7x7": (5.0, 9.0), "base_gf": (1.0, 15.0),
}
_IN22K_CLIP = {"large_7x7": 5.0, "large_gf": 1.0}
# The 384 fine-tunes: L-7x7 is the 224 model run at 384 (a 7x7 kernel fits any size); L-GF has
# its own constructor with the global filters sized for 384.
_FT384_MODEL = {"large_7x7": "hornet_large_7x7", "large_gf": "hornet_large_gf_384"}

SETTINGS = ("in1k", "in22k", "ft384", "fashion_mnist")


def get_config(arg: str = "in1k") -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, setting="in1k", variant="", runlocal=False, seed=0)
  if arg.setting not in SETTINGS:
    raise ValueError(f"unknown HorNet setting {arg.setting!r}; expected one of {SETTINGS}")
  c = {"in1k": _in1k, "in22k": _in22k, "ft384": _ft384,
       "fashion_mnist": _fashion_mnist}[arg.setting](arg)
  c.seed = arg.seed
  if arg.runlocal:
    c.input.batch_size = 8
    c.input.eval_batch_size = 8
    c.optimizer.accum_steps = 1
    c.total_steps = 4
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.schedule.warmup_steps = 2
  return common.with_model_keywords(c)


def _check_variant(arg, allowed, default: str) -> str:
  variant = arg.variant or default
  if variant not in allowed:
    raise ValueError(f"HorNet setting {arg.setting!r} has recipes for variant in "
                     f"{sorted(allowed)}, got variant={variant!r}")
  return variant


def _imagenet(c: ml_collections.ConfigDict, image_size: int) -> None:
  """The official timm-style ImageNet preprocessing (datasets.py) at `image_size`."""
  c.task = "classification"
  c.input.image_size = image_size
  c.input.channels = 3
  c.input.mean, c.input.std = common.IMAGENET_MEAN, common.IMAGENET_STD
  c.input.interpolation = "bicubic"
  c.input.crop_pct = 0.875 if image_size < 384 else 1.0
  c.input.train_crop = "random_resized"
  c.input.hflip = 0.5
  c.input.num_threads = 16
  # rand-m9-mstd0.5-inc1: timm's op set (no Cutout), 2 ops each applied with probability 0.5.
  c.input.randaugment.num_layers = 2
  c.input.randaugment.magnitude = 9.0
  c.input.randaugment.magnitude_std = 0.5
  c.input.randaugment.prob = 0.5
  c.input.randaugment.increasing = True
  c.input.randaugment.exclude_ops = ("Cutout",)
  c.input.mixup.mixup_alpha = 0.8
  c.input.mixup.cutmix_alpha = 1.0
  c.input.mixup.switch_prob = 0.5
  c.input.label_smoothing = 0.1
  c.optimizer.name = "adamw"
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999
  c.schedule.name = "warmup_cosine"
  c.log_every_steps = 100


def _schedule(c: ml_collections.ConfigDict, *, lr: float, batch_size: int, epochs: int,
              warmup_epochs: int, train_images: int, min_lr: float = 1e-6) -> None:
  c.input.batch_size = batch_size
  c.optimizer.lr = lr
  c.num_epochs = epochs
  c.schedule.warmup_steps = warmup_epochs * (train_images // batch_size)
  c.schedule.end_lr_factor = min_lr / lr


def _in1k(arg) -> ml_collections.ConfigDict:
  variant = _check_variant(arg, _IN1K, "tiny_7x7")
  clip_norm, magnitude = _IN1K[variant]
  c = common.base_config()
  c.model.name = f"hornet_{variant}"   # its registered drop_path_rate is the recipe's
  c.model.dtype = "bfloat16"          # compute on the accelerator; params stay f32
  c.data.name = "imagenet2012"
  _imagenet(c, 224)
  c.input.randaugment.magnitude = magnitude
  c.input.eval_batch_size = 256
  _schedule(c, lr=4e-3, batch_size=4096, epochs=300, warmup_epochs=20,
            train_images=_IMAGENET_1K_TRAIN)
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = clip_norm
  c.eval_splits = ("validation",)
  c.final_eval_splits = ("validation",)
  c.early_stopping.metric = "validation/accuracy"   # keeps the best checkpoint; never stops early
  c.early_stopping.mode = "max"
  return c


def _in22k(arg) -> ml_collections.ConfigDict:
  variant = _check_variant(arg, _IN22K_CLIP, "large_gf")
  c = common.base_config()
  c.model.name = f"hornet_{variant}"   # drop path 0.2, as the recipe
  c.model.dtype = "bfloat16"          # compute on the accelerator; params stay f32
  c.data.name = "image_folder"        # data.manual_dir = the 22K tree (train/<class>/...)
  _imagenet(c, 224)
  _schedule(c, lr=4e-3, batch_size=4096, epochs=90, warmup_epochs=5,
            train_images=_IMAGENET_22K_TRAIN)
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip_norm = _IN22K_CLIP[variant]
  c.eval_splits = ()                  # --disable_eval true
  c.final_eval_splits = ()
  c.checkpoint.every_steps = 1000
  return c


def _ft384(arg) -> ml_collections.ConfigDict:
  variant = _check_variant(arg, _FT384_MODEL, "large_gf")
  c = common.base_config()
  c.model.name = _FT384_MODEL[variant]
  c.model.drop_path_rate = 0.4
  c.model.dtype = "bfloat16"          # compute on the accelerator; params stay f32
  c.data.name = "imagenet2012"
  _imagenet(c, 384)
  c.input.mixup.mixup_alpha = 0.0     # --cutmix 0 --mixup 0; label smoothing 0.1 stays
  c.input.mixup.cutmix_alpha = 0.0
  c.input.eval_batch_size = 64
  _schedule(c, lr=5e-5, batch_size=512, epochs=30, warmup_epochs=0,
            train_images=_IMAGENET_1K_TRAIN)
  c.optimizer.weight_decay = 1e-8
  c.optimizer.clip_norm = 1.0
  c.init_from.dont_load = ("head/.*",)  # init_from.path = the 22K weights
  c.eval_splits = ("validation",)
  c.final_eval_splits = ("validation",)
  c.early_stopping.metric = "validation/accuracy"
  c.early_stopping.mode = "max"
  return c


def fashion_mnist_grids(image_size: int) -> tuple:
  """GF rFFT grids of stages 3 and 4 at `image_size` (maps of side image_size / 16 and / 32)."""
  side3, side4 = image_size // 16, image_size // 32
  return (None, None, (side3, side3 // 2 + 1), (side4, side4 // 2 + 1))


def _fashion_mnist(arg) -> ml_collections.ConfigDict:
  variant = _check_variant(arg, ("tiny_7x7", "tiny_gf"), "tiny_7x7")
  c = common.fashion_mnist_config()
  c.model.name = f"hornet_{variant}"
  # A narrow, shallow HorNet: the orders (2, 3, 4, 5), s = 1/3 and the layer scale stay. The 28x28
  # images are upsampled to 32 (the total stride): the stages see 8x8, 4x4, 2x2 and 1x1 maps.
  c.model.base_dim = 32
  c.model.depths = (1, 1, 3, 1)
  c.model.drop_path_rate = 0.0        # 4 epochs: too short to overfit
  if variant.endswith("_gf"):
    c.model.global_filter_sizes = fashion_mnist_grids(32)
  return c
