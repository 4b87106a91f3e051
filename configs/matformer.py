r"""MatFormer (MatLM, MatViT) and the softmax-attention LM baseline on the shared loop.

  python -m data.prepare tiny_shakespeare --manual_dir ~/data/tinyshakespeare    # once (bytes, 256)
  python train.py --config configs/matformer.py:lm_tiny_shakespeare --workdir runs/lm_ts
  python train.py --config configs/matformer.py:lm_tiny_shakespeare,runlocal --workdir runs/smoke
  python eval.py  --config configs/matformer.py:lm_tiny_shakespeare --workdir runs/lm_ts \
      --checkpoint=best --split=validation

  python train.py --config configs/matformer.py:matlm_tiny_shakespeare --workdir runs/matlm
  python eval.py  --config configs/matformer.py:matlm_tiny_shakespeare --workdir runs/matlm \
      --split=validation --config.evaluator=elastic   # S, M, L, XL and Mix'n'Match: table + plot
  python train.py --config configs/matformer.py:matvit_fashion_mnist --workdir runs/matvit

  python train.py --config configs/matformer.py:matlm_olmo_180m --workdir runs/matlm_olmo_180m \
      --config.data.name=wikitext103 --config.data.tokenizer=~/neox/tokenizer.json

Settings:

- `lm_tiny_shakespeare`: byte-level language modelling of tiny Shakespeare (TFDS's 90/5/5 split)
  with `transformer_lm_tiny`, MatLM at full width (900K parameters, the size of
  transnormer_llm_tiny). `model=NAME` trains another LM on exactly the same tokens and recipe
  (e.g. `model=transnormer_llm_tiny`). Recipe (nanoGPT's shakespeare_char, cut to about 5
  minutes of a 2-core CPU): sequences of 256 bytes, batch 16, 150 steps (614K target bytes, 0.6
  epoch), AdamW (0.9, 0.99), weight decay 0.1, lr 2e-3 with 20 warm-up steps and a cosine to
  2e-4, gradient clipping 1.0, no dropout; validation every 50 steps, the best by validation
  loss is tested. Metrics: loss (nats per byte), perplexity, bits per byte, next-byte accuracy.
- `matlm_tiny_shakespeare`: `matlm_tiny` (d_ff 584: S, M, L, XL = 73, 146, 292, 584) trained
  jointly (`objective=sum`, the official MatViT/MatFormer-OLMo objective: the four losses summed
  every step; `objective=sample`: one granularity drawn per step) on the same data. The recipe
  of lm_tiny_shakespeare with sequences of 128 bytes and 200 steps (410K target bytes), so that
  the summed objective (about 3x the work of one model per step) fits a few CPU minutes. The
  independently trained baselines of the same four sizes see the same batches:
  `objective=none,mlp_dim=73` (146, 292, 584). Evaluation reports every granularity
  (`validation/S/loss`, ...) and, unprefixed, their mean (early stopping uses the mean).
- `matvit_fashion_mnist`: `matvit_nano_patch4_28` (4 layers, width 64, MLP 256: S, M, L, XL =
  32, 64, 128, 256; patches of 4 x 4 on the 28 x 28 images) trained jointly on Fashion-MNIST
  for 3 epochs (test accuracy S/M/L/XL 85.6 / 85.9 / 85.8 / 85.9 %, benchmarks/RESULTS.md).
- `matlm_olmo_180m`, `matlm_olmo_460m`, `matlm_olmo_1300m`: MatFormer-OLMo's pre-training of
  `matlm_olmo_<size>` [Mat-OLMo], its four granularities summed on every batch (its objective):
  the Pile with the GPT-NeoX-20B tokenizer (not in the catalog: `data.name` is left empty, name
  your prepared corpus and bring the tokenizer's .json), sequences of 2048 tokens, global batch
  128 / 256 / 512 for 75K / 75K / 150K steps (20B / 40B / 160B tokens), AdamW (0.9, 0.95) with
  weight decay 0.01, lr 1e-3 after 4,000 warm-up steps then a cosine to 10 %, clipping 1.0, bf16
  compute (f32 params), no dropout.

Args: `model=NAME`, `objective=sum|sample|none`, `mlp_dim=N` (0: the variant's), `runlocal` (a
few steps, for a smoke run), `seed=N`. Longer runs: --config.total_steps=N.
"""
import ml_collections

from configs import common

# MatFormer-OLMo's sizes: global batch (sequences of 2048 tokens) and steps [Mat-OLMo].
_OLMO_PRETRAINING = {"180m": (128, 75_000), "460m": (256, 75_000), "1300m": (512, 150_000)}
_OLMO_SETTINGS = tuple(f"matlm_olmo_{size}" for size in _OLMO_PRETRAINING)
_SETTINGS = ("lm_tiny_shakespeare", "matlm_tiny_shakespeare", "matvit_fashion_mnist",
             *_OLMO_SETTINGS)
_DEFAULT_MODEL = {"lm_tiny_shakespeare": "transformer_lm_tiny",
                  "matlm_tiny_shakespeare": "matlm_tiny",
                  "matvit_fashion_mnist": "matvit_nano_patch4_28",
                  **{setting: setting for setting in _OLMO_SETTINGS}}
_OBJECTIVES = ("sum", "sample", "none")


def get_config(arg: str = "lm_tiny_shakespeare") -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, setting="lm_tiny_shakespeare", runlocal=False, seed=0, model="",
                         objective="sum", mlp_dim=0)
  if arg.setting not in _SETTINGS:
    raise ValueError(f"unknown MatFormer setting {arg.setting!r}; expected one of {_SETTINGS}")
  if arg.objective not in _OBJECTIVES:
    raise ValueError(f"objective must be one of {_OBJECTIVES}, got {arg.objective!r}")
  if arg.setting == "matvit_fashion_mnist":
    c = _fashion_mnist()
  elif arg.setting in _OLMO_SETTINGS:
    c = _olmo_pretraining(arg.setting.removeprefix("matlm_olmo_"))
  else:
    c = _tiny_shakespeare()
  c.seed = arg.seed
  c.model.name = arg.model or _DEFAULT_MODEL[arg.setting]
  if arg.mlp_dim:
    c.model.mlp_dim = arg.mlp_dim
  if arg.setting != "lm_tiny_shakespeare":
    c.nested = ml_collections.ConfigDict()
    # tasks.nested: '' trains the model as it is; 'sum' / 'sample' its granularities jointly
    c.nested.objective = "" if arg.objective == "none" else arg.objective
    c.nested.weights = ()      # per granularity: loss weights (sum) or probabilities (sample)
  if arg.setting == "matlm_tiny_shakespeare":
    c.data.seq_len = 128
    c.total_steps = 200        # 200 x 16 x 128 = 410K target bytes (0.4 epoch)
    c.eval_every_steps = 100
  if arg.runlocal:
    c.total_steps = 20
    c.samples.num_tokens = min(c.samples.num_tokens, 16)
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.schedule.warmup_steps = 5
    if arg.setting in _OLMO_SETTINGS:   # pre-training sizes: short sequences, a small batch
      c.data.seq_len = 128
      c.input.batch_size = 2
      c.input.eval_batch_size = 2
  return common.with_model_keywords(c)


def _tiny_shakespeare() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.task = "language_modeling"
  c.data.name = "tiny_shakespeare"
  c.data.tokenizer = "byte"          # or a SentencePiece .model / HF tokenizers .json file
  c.data.seq_len = 256
  c.samples.num_tokens = 200         # logged at each evaluation
  c.samples.prompts = ("ROMEO:",)

  c.input.batch_size = 16
  c.input.eval_batch_size = 64

  c.optimizer.name = "adamw"
  c.optimizer.lr = 2e-3
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip_norm = 1.0
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_steps = 20
  c.schedule.end_lr_factor = 0.1

  c.total_steps = 150
  c.log_every_steps = 10
  c.eval_every_steps = 50
  c.eval_splits = ("validation",)
  c.final_eval_splits = ("validation", "test")
  c.early_stopping.metric = "validation/loss"
  c.early_stopping.mode = "min"
  return c


def _olmo_pretraining(size: str) -> ml_collections.ConfigDict:
  """MatFormer-OLMo-<size> on a corpus of your own (see the module docstring)."""
  batch_size, steps = _OLMO_PRETRAINING[size]
  c = common.base_config()
  c.task = "language_modeling"
  c.model.dtype = "bfloat16"         # compute; params stay f32 (the official amp bf16)
  c.data.name = ""                   # the Pile is not in the catalog: name your prepared corpus
  c.data.tokenizer = ""              # the GPT-NeoX-20B tokenizer's .json (50,277 entries)
  c.data.seq_len = 2048
  c.samples.num_tokens = 64
  c.input.batch_size = batch_size
  c.input.eval_batch_size = 64
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-3
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
  c.optimizer.weight_decay = 0.01
  c.optimizer.clip_norm = 1.0
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_steps = 4000
  c.schedule.end_lr_factor = 0.1
  c.total_steps = steps
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.eval_splits = ("validation",)
  c.final_eval_splits = ("validation", "test")
  c.early_stopping.metric = "validation/loss"
  c.early_stopping.mode = "min"
  return c


def _fashion_mnist() -> ml_collections.ConfigDict:
  """Joint training of a small MatViT on Fashion-MNIST: the vision families' shared recipe
  (common.fashion_mnist_config: flips, label smoothing 0.1, AdamW wd 0.05, cosine, test split
  only) at 28 x 28, 3 epochs of batch 64, lr 3e-3 with 1/3 epoch of warm-up, clipping 1.0. No
  random crops: in one epoch of the XL model alone they cost 7 points (72.5 vs 79.6 % at batch
  128), and the small ViT learns faster with more, smaller steps (81.8 % at batch 64)."""
  c = common.fashion_mnist_config()
  c.input.image_size = 28            # the patch-4 model takes the 28 x 28 images as they are
  c.input.batch_size = 64
  c.optimizer.lr = 3e-3
  c.optimizer.clip_norm = 1.0
  c.schedule.warmup_steps = 312
  c.num_epochs = 3
  return c
