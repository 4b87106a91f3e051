r"""BiFormer (CVPR 2023): the official ImageNet-1K recipe of each released variant; Fashion-MNIST.

ImageNet-1K from scratch at 224 (`in1k`, the default setting; variant tiny, small or base):

  python -m data.prepare imagenet2012 --manual_dir ~/data/imagenet          # once
  python train.py --config configs/biformer.py:variant=tiny --workdir runs/biformer_tiny

A small BiFormer (widths 32..256, depths 1-1-2-1, 2x2 routing regions, 32x32 grey input) on
Fashion-MNIST, for a CPU:

  python -m data.prepare fashion_mnist --manual_dir ../shared/data/fashion_mnist   # once
  python train.py --config configs/biformer.py:fashion_mnist --workdir runs/biformer_fmnist

Args: `variant=tiny|small|base` (the model `biformer_<variant>`), `runlocal` (a few small steps: a
smoke run of any setting), `seed=N`.

The recipe is the README's training command run through the official main.py (rayleizhu/BiFormer
@ 1697bbbe, DeiT's loop and defaults in configs/train_args.yaml): 300 epochs, AdamW (betas
0.9/0.999, eps 1e-8), weight decay 0.05, lr 5e-4 per 512 images scaled to the global batch of 1024
(8 GPUs x 128: lr 1e-3), 5 warmup epochs then cosine to min_lr 1e-5, no gradient clipping, drop
path 0.1 (T, main.py's default) / 0.15 (S, the README command) / 0.4 (B, the value the spec gives,
not checked against a command), RandAugment `rand-m9-mstd0.5-inc1`, Mixup 0.8 / CutMix 1.0 (switch
0.5), label smoothing 0.1, random resized crop + flip at 224 (bicubic), eval resize 256 + center
crop 224. The S example in the README names a 2-node run (global batch 2048, lr 2e-3): pass
`--config.input.batch_size=2048 --config.optimizer.lr=2e-3` for that reading.

What this loop does not do (yet) and the official runs did: an EMA of the weights (decay 0.99996;
the released checkpoints are the EMA's), random erasing (probability 0.25), DeiT's repeated
augmentation (3 augmented copies of each image per batch), no weight decay on biases and norm
params (optax.adamw here decays every param), warming up from 1e-6 rather than 0, and stepping the
lr once per epoch rather than per step. Expect a somewhat lower accuracy without those parts.
"""
import ml_collections

from configs import common

_IMAGENET_1K_TRAIN = 1_281_167
VARIANTS = {"tiny": 0.1, "small": 0.15, "base": 0.4}   # variant -> training drop-path rate
SETTINGS = ("in1k", "fashion_mnist")


def get_config(arg: str = "in1k") -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, setting="in1k", variant="tiny", runlocal=False, seed=0)
  if arg.setting not in SETTINGS:
    raise ValueError(f"unknown BiFormer setting {arg.setting!r}; expected one of {SETTINGS}")
  c = _in1k(arg) if arg.setting == "in1k" else _fashion_mnist()
  c.seed = arg.seed
  if arg.runlocal:
    c.input.batch_size = 8
    c.input.eval_batch_size = 8
    c.total_steps = 4
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.schedule.warmup_steps = 2
  return common.with_model_keywords(c)


def _in1k(arg) -> ml_collections.ConfigDict:
  if arg.variant not in VARIANTS:
    raise ValueError(f"BiFormer has ImageNet recipes for variant in {sorted(VARIANTS)}, "
                     f"got variant={arg.variant!r}")
  c = common.base_config()
  c.task = "classification"
  c.model.name = f"biformer_{arg.variant}"
  c.model.drop_path_rate = VARIANTS[arg.variant]
  c.model.dtype = "bfloat16"               # compute on the accelerator; params stay f32
  c.data.name = "imagenet2012"

  c.input.image_size = 224
  c.input.channels = 3
  c.input.mean, c.input.std = common.IMAGENET_MEAN, common.IMAGENET_STD
  c.input.interpolation = "bicubic"
  c.input.crop_pct = 0.875                 # int(256 / 224 * 224) = 256, then the center 224
  c.input.train_crop = "random_resized"    # scale (0.08, 1), ratio (3/4, 4/3): timm's defaults
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
  c.input.batch_size = 1024
  c.input.eval_batch_size = 256

  c.optimizer.name = "adamw"
  c.optimizer.lr = 5e-4 * c.input.batch_size / 512   # main.py's linear scaling rule
  c.optimizer.weight_decay = 0.05
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_steps = 5 * (_IMAGENET_1K_TRAIN // c.input.batch_size)
  c.schedule.end_lr_factor = 1e-5 / c.optimizer.lr
  c.num_epochs = 300
  c.log_every_steps = 100
  c.eval_splits = ("validation",)
  c.final_eval_splits = ("validation",)
  c.early_stopping.metric = "validation/accuracy"   # keeps the best checkpoint; never stops early
  c.early_stopping.mode = "max"
  return c


def _fashion_mnist() -> ml_collections.ConfigDict:
  c = common.fashion_mnist_config()
  c.model.name = "biformer_tiny"
  # BiFormer-T's layout at a CPU's scale. The 28x28 images are upsampled to 32, so the stages see
  # 8x8, 4x4, 2x2 and 1x1 maps; n_win = 2 divides the routed ones: stage 1 attends inside its
  # 4x4-token region (topk 1, as stage 1 of the released models), stages 2 and 3 route each region
  # to 2 of the 4, stage 4 attends over everything. 2 heads in stage 1 (head_dim 16).
  c.model.depths = (1, 1, 2, 1)
  c.model.embed_dims = (32, 64, 128, 256)
  c.model.qk_dims = (32, 64, 128, 256)
  c.model.head_dim = 16
  c.model.n_win = 2
  c.model.topks = (1, 2, 2, -2)
  return c
