r"""MaxViT (ECCV 2022): the official ImageNet-1K recipes, Fashion-MNIST on a CPU, and fine-tuning
converted weights on a new dataset.

ImageNet-1K (`in1k`, the default setting; variant tiny|small|base|large, res 224|384|512). At 224
the model is trained from scratch; at 384 and 512 it is fine-tuned from the 224 weights (a zoo
workdir or a converted official checkpoint), as the official recipe does:

  python -m data.prepare imagenet2012 --manual_dir ~/data/imagenet          # once
  python train.py --config configs/maxvit.py:variant=tiny,res=224 --workdir runs/maxvit_tiny_224
  python train.py --config configs/maxvit.py:variant=tiny,res=384 --workdir runs/maxvit_tiny_384 \
      --config.init_from.path=runs/maxvit_tiny_224

A small MaxViT on Fashion-MNIST for a CPU (`fashion_mnist`; the model and its cost are described
in `_fashion_mnist`):

  python -m data.prepare fashion_mnist --manual_dir ../shared/data/fashion_mnist   # once
  python train.py --config configs/maxvit.py:fashion_mnist --workdir runs/maxvit_fmnist

Fine-tuning converted official weights on another dataset with a new head (`finetune`; `data=` a
zoo image dataset, default fashion_mnist, or `image_folder` with --config.data.manual_dir=DIR):

  python -m models.convert maxvit maxvit_tiny_tf_224.safetensors converted/maxvit_tiny_224 \
      --model maxvit_tiny_tf_224
  python train.py --config configs/maxvit.py:finetune,variant=tiny,res=224 --workdir runs/ft \
      --config.init_from.path=converted/maxvit_tiny_224

Args: `variant=tiny|small|base|large|xlarge` (the model `maxvit_<variant>_tf_<res>`; xlarge has
no ImageNet-1K recipe, only `finetune`), `res=224|384|512`, `data=NAME` (finetune), `runlocal` (a
few small steps: a smoke run of any setting), `seed=N`.

The recipe is the official one (google-research/maxvit @ 70a47072, `hp/vision.py` and
`hp/vision_i1k.py`). From scratch at 224: 300 epochs at a global batch of 4096, AdamW, lr 3e-3
after 10,000 linear warm-up steps, cosine to 1e-5, weight decay 0.05, gradient clipping 1.0, drop
path 0.2/0.3/0.4/0.6 (T/S/B/L: 1 - survival_prob, the registered variants' defaults), RandAugment
2 ops at magnitude 15 (TF's op set, each op always applied), Mixup 0.8 (no CutMix), label
smoothing 0.1, ImageNet mean/std ('legacy' preprocessing). Fine-tuning at 384/512: 30 epochs at a
batch of 512, constant lr 5e-5, weight decay 1e-8, the same augmentation, pixels scaled to [-1, 1];
the model stores TF's 13 x 13 relative-position tables (`rel_pos_size=13`), so the 224 weights
load unchanged and are resized bilinearly on every forward as in TF, and the classification head
(TF's `cls_head`: the pre-logits and logits Dense) starts fresh (`init_finetune`). Evaluation:
bicubic resize and center crop res / (res + 32) (TF's crop padding of 32). The released code has
no input pipeline; training crops are the Inception-style random resized crop (area 0.08-1) with a
horizontal flip of TF's ImageNet pipelines.

What this loop does not do (yet) and the official runs did: an EMA of the weights (decay 0.9999;
the released checkpoints are the EMA's), and no weight decay on biases and norm scales
(`weight_decay_exclude`; optax.adamw here decays every param). Expect a somewhat lower accuracy
without them.
"""
import ml_collections

from configs import common

_IMAGENET_1K_TRAIN = 1_281_167
_IN1K_VARIANTS = ("tiny", "small", "base", "large")   # hp/vision_i1k.py; XL is IN-21K only
VARIANTS = (*_IN1K_VARIANTS, "xlarge")
RESOLUTIONS = (224, 384, 512)
SETTINGS = ("in1k", "fashion_mnist", "finetune")
# TF's cls_head: the tanh pre-logits Dense and the logits Dense (the LayerNorm before is kept).
HEAD = ("head/(pre_logits|fc)/.*",)
_TF_CROP_PADDING = 32   # eval: center crop res / (res + 32)
_MINUS_ONE_TO_ONE = ((0.5,), (0.5,))   # (x - 127.5) / 127.5, the 384/512 preprocessing
_NO_VALIDATION = ("fashion_mnist",)   # train and test only: evaluate on test


def get_config(arg: str = "in1k") -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, setting="in1k", variant="tiny", res=224, data="fashion_mnist",
                         runlocal=False, seed=0)
  if arg.setting not in SETTINGS:
    raise ValueError(f"unknown MaxViT setting {arg.setting!r}; expected one of {SETTINGS}")
  if arg.setting != "fashion_mnist":
    allowed = _IN1K_VARIANTS if arg.setting == "in1k" else VARIANTS
    if arg.variant not in allowed:
      raise ValueError(f"MaxViT setting {arg.setting!r} has recipes for variant in {allowed}, "
                       f"got variant={arg.variant!r}")
    if arg.res not in RESOLUTIONS:
      raise ValueError(f"MaxViT is published at res in {RESOLUTIONS}, got res={arg.res}")
  c = {"in1k": _in1k, "fashion_mnist": _fashion_mnist, "finetune": _finetune}[arg.setting](arg)
  c.seed = arg.seed
  if arg.runlocal:
    c.input.batch_size = 8
    c.input.eval_batch_size = 8
    c.total_steps = 4
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.schedule.warmup_steps = 2
    c.recompute_bn_stats = 2       # 4 steps leave BatchNorm's running statistics at their init
  return common.with_model_keywords(c)


def _imagenet_input(c: ml_collections.ConfigDict, res: int) -> None:
  """TF preprocessing at `res` and the recipe's augmentation (RandAugment 2x15, Mixup 0.8)."""
  c.task = "classification"
  c.input.image_size = res
  c.input.channels = 3
  # 'legacy_preprocess' (ImageNet statistics) for the 224 checkpoints, [-1, 1] at 384/512.
  c.input.mean, c.input.std = ((common.IMAGENET_MEAN, common.IMAGENET_STD) if res == 224
                               else _MINUS_ONE_TO_ONE)
  c.input.interpolation = "bicubic"
  c.input.crop_pct = res / (res + _TF_CROP_PADDING)
  c.input.train_crop = "random_resized"   # area (0.08, 1), aspect (3/4, 4/3)
  c.input.hflip = 0.5
  c.input.num_threads = 16
  c.input.randaugment.num_layers = 2
  c.input.randaugment.magnitude = 15.0
  c.input.randaugment.prob = 1.0          # TF's RandAugment applies every picked op
  c.input.mixup.mixup_alpha = 0.8
  c.input.mixup.cutmix_alpha = 0.0
  c.input.label_smoothing = 0.1
  c.optimizer.name = "adamw"
  c.optimizer.clip_norm = 1.0
  c.log_every_steps = 100


def _in1k(arg) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.model.name = f"maxvit_{arg.variant}_tf_{arg.res}"   # its drop_path_rate is the recipe's
  c.model.dtype = "bfloat16"                            # compute; params stay f32
  c.data.name = "imagenet2012"
  _imagenet_input(c, arg.res)
  if arg.res == 224:
    c.input.batch_size = 4096
    c.num_epochs = 300
    c.optimizer.lr = 3e-3
    c.optimizer.weight_decay = 0.05
    c.schedule.name = "warmup_cosine"
    c.schedule.warmup_steps = 10_000
    c.schedule.end_lr_factor = 1e-5 / 3e-3
  else:  # fine-tuning the 224 weights: --config.init_from.path=<224 workdir or converted dir>
    c.model.rel_pos_size = 13
    c.input.batch_size = 512
    c.num_epochs = 30
    c.optimizer.lr = 5e-5
    c.optimizer.weight_decay = 1e-8
    c.schedule.name = "constant"
    c.init_from.dont_load = HEAD
  c.input.eval_batch_size = 256
  c.eval_splits = ("validation",)
  c.final_eval_splits = ("validation",)
  return c


def _finetune(arg) -> ml_collections.ConfigDict:
  """Converted weights (--config.init_from.path) onto `arg.data` with a new head.

  The official fine-tuning optimizer (AdamW, constant lr 5e-5, weight decay 1e-8, clipping 1.0,
  label smoothing 0.1) at a batch of 64, with the lighter augmentation a small dataset wants: the
  random resized crop and flip only (no RandAugment or Mixup).
  """
  c = common.base_config()
  c.model.name = f"maxvit_{arg.variant}_tf_{arg.res}"
  c.model.drop_path_rate = 0.1
  c.model.dtype = "bfloat16"         # compute; params stay f32
  c.data.name = arg.data
  _imagenet_input(c, arg.res)
  c.input.randaugment.num_layers = 0
  c.input.mixup.mixup_alpha = 0.0
  c.input.batch_size = 64
  c.input.eval_batch_size = 64
  c.optimizer.lr = 5e-5
  c.optimizer.weight_decay = 1e-8
  c.schedule.name = "constant"
  c.num_epochs = 10
  c.init_from.dont_load = HEAD
  evaluate_on = ("test",) if arg.data in _NO_VALIDATION else ("validation",)
  c.eval_splits = evaluate_on
  c.final_eval_splits = ("test",)
  c.early_stopping.metric = f"{evaluate_on[0]}/accuracy"   # the best checkpoint is tested
  c.early_stopping.mode = "max"
  return c


def _fashion_mnist(arg) -> ml_collections.ConfigDict:
  """A small MaxViT on Fashion-MNIST, sized for 2 CPU cores.

  Three stages of one MaxViT block each (widths 32/64/128, heads of 32 as in every variant) after
  a 32-wide stem, 747,328 parameters; the 28 x 28 images are resized to 32 so that every map
  divides into 2 x 2 windows and grids (stage maps 8, 4, 2). The block layout, MBConv,
  relative-position bias and head are the published ones; only widths, depths and the window are
  small.

  4 epochs at a batch of 256 (936 steps), AdamW lr 3e-3, 100 warm-up steps, cosine to 0: 91.04 %
  test accuracy in 10.7 min wall (16.9 CPU-min) on 2 cores (benchmarks/RESULTS.md, "Fashion-MNIST
  on a CPU"). The test accuracy reads low early in the run (26.8 % after epoch 1):
  BatchNorm's running statistics (momentum 0.99) trail weights that still move fast at the peak
  lr, and catch up as the lr decays.
  """
  c = common.fashion_mnist_config()
  c.model.name = "maxvit_tiny_tf_224"
  c.model.embed_dims = (32, 64, 128)
  c.model.depths = (1, 1, 1)
  c.model.stem_widths = (32, 32)
  c.model.img_size = 32
  c.model.window_size = 2
  c.model.drop_path_rate = 0.1
  c.input.batch_size = 256
  c.optimizer.lr = 3e-3
  c.optimizer.clip_norm = 1.0
  c.schedule.warmup_steps = 100
  c.log_every_steps = 25
  return c
