r"""MatFormer (MatLM, MatViT) and the softmax-attention LM baseline on the shared loop.

  python -m data.prepare tiny_shakespeare --manual_dir ~/data/tinyshakespeare    # once (bytes, 256)
  python train.py --config configs/matformer.py:lm_tiny_shakespeare --workdir runs/lm_ts
  python train.py --config configs/matformer.py:lm_tiny_shakespeare,runlocal --workdir /tmp/smoke
  python eval.py  --config configs/matformer.py:lm_tiny_shakespeare --workdir runs/lm_ts \
      --checkpoint=best --split=validation

  python train.py --config configs/matformer.py:matlm_tiny_shakespeare --workdir runs/matlm
  python eval.py  --config configs/matformer.py:matlm_tiny_shakespeare --workdir runs/matlm \
      --split=validation --elastic            # S, M, L, XL and Mix'n'Match: table + plot
  python train.py --config configs/matformer.py:matvit_fashion_mnist --workdir runs/matvit

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

Args: `model=NAME`, `objective=sum|sample|none`, `mlp_dim=N` (0: the variant's), `runlocal` (a
few steps, for a smoke run), `seed=N`. Longer runs: --config.total_steps=N.
"""
import ml_collections

from configs import common

_SETTINGS = ("lm_tiny_shakespeare", "matlm_tiny_shakespeare", "matvit_fashion_mnist")
_DEFAULT_MODEL = {"lm_tiny_shakespeare": "transformer_lm_tiny",
                  "matlm_tiny_shakespeare": "matlm_tiny",
                  "matvit_fashion_mnist": "matvit_nano_patch4_28"}
_OBJECTIVES = ("sum", "sample", "none")


def get_config(arg: str = "lm_tiny_shakespeare") -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, setting="lm_tiny_shakespeare", runlocal=False, seed=0, model="",
                         objective="sum", mlp_dim=0)
  if arg.setting not in _SETTINGS:
    raise ValueError(f"unknown MatFormer setting {arg.setting!r}; expected one of {_SETTINGS}")
  if arg.objective not in _OBJECTIVES:
    raise ValueError(f"objective must be one of {_OBJECTIVES}, got {arg.objective!r}")
  c = _fashion_mnist() if arg.setting == "matvit_fashion_mnist" else _tiny_shakespeare()
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
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.schedule.warmup_steps = 5
  return c


def _tiny_shakespeare() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.task = "language_modeling"
  c.data.name = "tiny_shakespeare"
  c.data.tokenizer = "byte"          # or a SentencePiece .model / HF tokenizers .json file
  c.data.seq_len = 256

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
