r"""MatFormer / the softmax-attention LM baseline on the shared loop.

  python -m data.prepare tiny_shakespeare --manual_dir ~/data/tinyshakespeare    # once (bytes, 256)
  python train.py --config configs/matformer.py:lm_tiny_shakespeare --workdir runs/lm_ts
  python train.py --config configs/matformer.py:lm_tiny_shakespeare,runlocal --workdir /tmp/smoke
  python eval.py  --config configs/matformer.py:lm_tiny_shakespeare --workdir runs/lm_ts \
      --checkpoint=best --split=validation

`lm_tiny_shakespeare`: byte-level language modelling of tiny Shakespeare (TFDS's 90/5/5 split) with
`transformer_lm_tiny`, MatLM at full width (900K parameters, the size of transnormer_llm_tiny).
Extra args: `model=NAME` trains another LM on exactly the same tokens and recipe (e.g.
`model=transnormer_llm_tiny` for the linear-attention side of the comparison), `runlocal` (a few
steps, for a smoke run), `seed=N`.

Recipe (nanoGPT's shakespeare_char, cut to about 5 minutes of a 2-core CPU): sequences of 256
bytes, batch 16, 150 steps (614K target bytes, 0.6 epoch), AdamW (0.9, 0.99), weight decay 0.1,
lr 2e-3 with 20 warm-up steps and a cosine to 2e-4, gradient clipping 1.0, no dropout; validation
every 50 steps, the best by validation loss is tested. Metrics: loss (nats per byte), perplexity,
bits per byte, next-byte accuracy. Longer runs: --config.total_steps=N.
"""
import ml_collections

from configs import common

_SETTINGS = ("lm_tiny_shakespeare",)


def get_config(arg: str = "lm_tiny_shakespeare") -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, setting="lm_tiny_shakespeare", runlocal=False, seed=0,
                         model="transformer_lm_tiny")
  if arg.setting not in _SETTINGS:
    raise ValueError(f"unknown MatFormer setting {arg.setting!r}; expected one of {_SETTINGS}")

  c = common.base_config()
  c.seed = arg.seed
  c.task = "language_modeling"
  c.model.name = arg.model

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

  if arg.runlocal:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.schedule.warmup_steps = 5
  return c
