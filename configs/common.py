"""What every config shares: the `:arg` parser, the loop's default settings, dataset pixel
statistics.

Family configs start from `base_config()` and set only what differs, so every run has the
same keys and `--config.x.y=v` overrides are checked (locked ConfigDict: a typo is refused
with a "did you mean" suggestion).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import models
from ops import sharding

# Per-channel pixel statistics (pixel / 255) for `config.input.mean` / `std`.
IMAGENET_MEAN, IMAGENET_STD = models.IMAGENET_MEAN, models.IMAGENET_STD
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.286,), (0.353,)   # its 60,000 training images


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses big_vision-style config args: "etth1_96,runlocal,seed=3".

  The first bare token (no `=`) that is not a boolean key fills the `setting` key; a bare token
  naming a boolean key sets it to True; `key=value` converts value to the default's type.
  """
  out = ml_collections.ConfigDict(defaults)
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, has_value, value = token.partition("=")
    if not has_value:
      if isinstance(defaults.get(key), bool):
        out[key] = True
        continue
      key, value = "setting", token
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; expected one of {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} must be true or false")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """The loop's settings with their defaults; family configs fill model, data and task."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = ""                      # 'forecasting' | 'classification' | 'language_modeling' (tasks/)

  c.model = ml_collections.ConfigDict()
  c.model.name = ""               # a models.list_models() name; other keys of c.model are overrides
  # (with_model_keywords lists every keyword of the model; None = the variant's value)
  c.model.dtype = "float32"       # compute; "bfloat16" on accelerators (softmax, norms, loss stay f32)
  c.model.param_dtype = "float32"  # storage: f32 master weights

  c.data = ml_collections.ConfigDict()
  c.data.name = ""
  c.data.data_dir = ""            # TFDS data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.manual_dir = ""          # raw files; if set, a missing prepared dataset is prepared from here
  c.data.file = ""                # dataset 'custom': the CSV to read (in manual_dir)

  c.input = ml_collections.ConfigDict()
  c.input.batch_size = 32         # global batch (per optimizer update)
  c.input.eval_batch_size = 256
  c.input.num_threads = 1         # grain threads making training batches (decoding, augmenting)
  # Image classification (data/augment.py). The defaults serve the stored pixels / pixel_max as they
  # are; a vision recipe sets image_size, mean/std and the augmentation.
  c.input.image_size = 0          # square model input side; 0 = as stored (no resize or crop)
  c.input.channels = 0            # 0 = as stored; 3 = grey repeated to RGB; 1 = RGB to grey (luma)
  c.input.mean = (0.0,)           # (pixel / pixel_max - mean) / std: one value or one per channel
  c.input.std = (1.0,)
  c.input.interpolation = "bicubic"  # bicubic | bilinear | nearest | lanczos | box | hamming
  c.input.crop_pct = 0.875        # eval: short side -> floor(image_size / crop_pct), center crop
  c.input.crop_mode = "center"    # eval: center (keep the aspect) | squash (resize both sides)
  c.input.train_crop = "random_resized"  # random_resized | center (the eval crop) | resize (whole)
  c.input.crop_scale = (0.08, 1.0)       # random_resized: area fraction ~ U(crop_scale)
  c.input.crop_ratio = (3 / 4, 4 / 3)    # random_resized: aspect w/h ~ log-uniform in crop_ratio
  c.input.hflip = 0.0             # probability of a horizontal flip
  c.input.randaugment = ml_collections.ConfigDict()
  c.input.randaugment.num_layers = 0     # ops per image; 0 = off (MaxViT: 2; timm rand-m9: 2)
  c.input.randaugment.magnitude = 10.0   # 0..10 scale, more allowed (MaxViT: 15; timm rand-m9: 9)
  c.input.randaugment.magnitude_std = 0.0  # timm 'mstd': magnitude ~ N(magnitude, std) per op
  c.input.randaugment.prob = 1.0         # chance each picked op is applied (TF: 1.0; timm: 0.5)
  c.input.randaugment.increasing = False  # timm 'inc1' variants of Posterize/Solarize/enhance ops
  c.input.randaugment.exclude_ops = ()   # e.g. ('Cutout',): timm's op set (data/randaugment.OPS)
  c.input.mixup = ml_collections.ConfigDict()
  c.input.mixup.mixup_alpha = 0.0        # lam ~ Beta(a, a); 0 = no Mixup
  c.input.mixup.cutmix_alpha = 0.0       # 0 = no CutMix
  c.input.mixup.switch_prob = 0.5        # both set: chance of CutMix instead of Mixup
  c.input.mixup.prob = 1.0               # chance a batch is mixed at all
  c.input.label_smoothing = 0.0   # training targets (1 - s) one-hot + s / num_classes

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"      # adam | adamw | sgd
  c.optimizer.lr = 1e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.0
  c.optimizer.momentum = 0.9      # sgd only
  c.optimizer.clip_norm = 0.0     # 0 = no clipping
  c.optimizer.accum_steps = 1     # gradient accumulation (optax.MultiSteps)

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "constant"    # constant | warmup_cosine | step_decay
  c.schedule.warmup_steps = 0
  c.schedule.end_lr_factor = 0.0  # warmup_cosine: final lr = lr * end_lr_factor
  c.schedule.decay_rate = 0.5     # step_decay: lr *= decay_rate every decay_every_epochs ...
  c.schedule.decay_every_epochs = 1
  c.schedule.decay_begin_epochs = 1  # ... after this many epochs at the base lr (iTransformer 'type1')

  c.num_epochs = 10               # total length, unless total_steps > 0
  c.total_steps = 0
  c.log_every_steps = 50
  c.eval_every_steps = 0          # 0 = once per epoch
  c.eval_splits = ("validation",)  # evaluated periodically
  c.final_eval_splits = ("test",)  # evaluated once at the end, on the best (or last) checkpoint
  c.evaluator = ""                # eval.py: '' = the model as it is; 'elastic' (tasks/elastic.py)
  # BatchNorm models: re-estimate the running statistics from this many training batches before
  # each evaluation (precise BN); 0 keeps them. A short run's averages trail its weights.
  c.recompute_bn_stats = 0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0    # 0 = at every evaluation
  c.checkpoint.keep = 2           # latest N kept, plus the best by the early-stopping metric
  c.checkpoint.async_save = True

  c.early_stopping = ml_collections.ConfigDict()
  c.early_stopping.metric = ""     # e.g. 'validation/mse'; '' = keep training, final eval on the last step
  c.early_stopping.mode = "min"
  c.early_stopping.patience = 0    # evaluations without improvement before stopping; 0 = never stop

  c.init_from = ml_collections.ConfigDict()
  c.init_from.path = ""            # zoo checkpoint / workdir / converted or official weights
  c.init_from.dont_load = ()       # regexes of param paths kept fresh, e.g. ('head/.*',)

  # Language models: at each evaluation, continue each prompt by num_tokens sampled tokens and log
  # the text (TensorBoard, W&B, the console); 0 = no samples.
  c.samples = ml_collections.ConfigDict()
  c.samples.num_tokens = 0
  c.samples.prompts = ("\n",)
  c.samples.temperature = 0.8     # 0 = greedy
  c.samples.top_k = 40            # 0 = the whole vocabulary

  # Weights & Biases (pip install 'jax-paper-zoo[wandb]'): off unless a project is named.
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ""
  c.wandb.entity = ""              # '' = your default entity
  c.wandb.name = ""                # '' = the workdir's name
  c.wandb.mode = ""                # online | offline | disabled; '' = wandb's default ($WANDB_MODE)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # data parallelism; -1 = all devices not used by the other axes
  c.mesh.fsdp = 1                  # data parallelism with parameters and optimizer state split (FSDP)
  c.mesh.tensor = 1                # tensor parallelism: heads and hidden units split (Megatron)
  # Logical axis -> mesh axes (ops.sharding.RULES), e.g. --config.mesh.rules.mlp='("fsdp",)'
  # or --config.mesh.rules.embed='()' to keep the model width whole.
  c.mesh.rules = ml_collections.ConfigDict(sharding.RULES)
  return c


def with_model_keywords(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Lists every keyword of the model `c.model.name` builds in `c.model`, so that each is a
  command-line override (`--config.model.drop_path_rate=0.2`). A keyword the config does not set
  holds None: the variant's value, whatever variant the name is later changed to."""
  for key, field_type in models.model_keywords(c.model.name).items():
    if key not in c.model:
      c.model[key] = config_dict.placeholder(field_type)
  return c


def model_overrides(c: ml_collections.ConfigDict) -> dict:
  """The keywords `c.model` sets for `models.create_model(c.model.name, ...)`."""
  return {k: v for k, v in c.model.items() if k != "name" and v is not None}


def fashion_mnist_config() -> ml_collections.ConfigDict:
  """The small-CNN/ViT recipe the vision families share on Fashion-MNIST (2 CPU cores): the
  28 x 28 images resized to 32 (so 4 stride-2 stages divide them), flips, label smoothing 0.1,
  batch 128, AdamW lr 2e-3 wd 0.05, 200 warm-up steps then cosine, 4 epochs; evaluation on test,
  the only other split. A family config sets its model and overrides what differs."""
  c = base_config()
  c.task = "classification"
  c.model.in_chans = 1
  c.data.name = "fashion_mnist"
  c.input.image_size = 32
  c.input.crop_pct = 1.0              # eval: the whole image, resized to 32
  c.input.train_crop = "resize"       # a few epochs: flips only (random crops cost accuracy here)
  c.input.interpolation = "bilinear"
  c.input.hflip = 0.5
  c.input.mean, c.input.std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
  c.input.label_smoothing = 0.1
  c.input.batch_size = 128
  c.input.eval_batch_size = 500
  c.optimizer.name = "adamw"
  c.optimizer.lr = 2e-3
  c.optimizer.weight_decay = 0.05
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_steps = 200
  c.num_epochs = 4
  c.log_every_steps = 50
  c.eval_splits = ("test",)            # Fashion-MNIST has train and test only
  c.final_eval_splits = ("test",)
  return c
