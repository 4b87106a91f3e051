r"""TransNormerLLM and TransNormer (v1) language models on the shared loop.

TransNormerLLM pre-training (`tnl_385m`, `tnl_1b`, `tnl_7b`, `tnl_15b`: the models
`transnormer_llm_<size>`) on a corpus and tokenizer of your own:

  python -m data.prepare wikitext103 --manual_dir ~/data/wikitext-103 \
      --tokenizer ~/tnl/tokenizer.model --seq_len 2048                     # once
  python train.py --config configs/transnormer.py:tnl_385m,tokenizer=~/tnl/tokenizer.model \
      --workdir runs/tnl_385m --config.data.name=wikitext103

TransNormer v1 causal LMs on WikiText-103 as the official fairseq scripts train them
(`wikitext103_t1`, `wikitext103_t2`: `transnormer_t1` / `transnormer_t2`):

  python train.py --config configs/transnormer.py:wikitext103_t2,tokenizer=~/wt103/words.json \
      --workdir runs/transnormer_t2_wt103

The small comparison on a CPU (`tiny_shakespeare`): `transnormer_llm_tiny` (901K parameters) on
tiny Shakespeare bytes with exactly the data, tokens and recipe of
`configs/matformer.py:lm_tiny_shakespeare`, which trains its softmax-attention twin
`transformer_lm_tiny` (900K); the recipe is read from there, so the two cannot drift apart:

  python train.py --config configs/transnormer.py:tiny_shakespeare --workdir runs/tnl_ts \
      --config.data.manual_dir=../shared/data/tiny_shakespeare

Args: `tokenizer=PATH` (the settings that need one; below), `runlocal` (a few small steps: a smoke
run), `seed=N`.

What the papers publish and what they do not (spec sequence.md §B2, §C3):

* TransNormerLLM pre-training [LA-paper, README]: a private 6 TB / ~2 T-token corpus (not
  released: `data.name` is left empty, name your own prepared corpus), Baichuan's BPE tokenizer
  (64,000 entries; its SentencePiece `tokenizer.model` ships with the HF models) for
  385M/1B/7B and a ~100K "Titoken" vocabulary for 15B, bf16 mixed precision (here
  `model.dtype=bfloat16`, f32 params), sequences of 2048 tokens (published for the <= 1B
  models; assumed for 7B and 15B), tokens seen 1.0 T / 1.2 T / 1.4 T / 2.0 T (total_steps is
  that many tokens at the batch below). **Not published**: optimizer, learning rate, schedule,
  batch size, weight decay, clipping. The values here are placeholders and say so: AdamW
  (0.9, 0.95) with weight decay 0.1 (the settings of the official fine-tuning script), and
  LLaMA-1's pre-training recipe for the rest (4M-token batches = 2048 x 2048, lr 3e-4, 2,000
  warm-up steps, cosine to 10 %, gradient clipping 1.0). A batch of 2048 sequences is the global
  batch; split it over gradient accumulation with `--config.optimizer.accum_steps`.
* TransNormer v1 LM [TN-scripts `train_alm.sh`], all published: WikiText-103 with fairseq's
  word-level vocabulary (267,744 words; prepare the `wikitext103` corpus with a word-level
  tokenizer, e.g. a Hugging Face `tokenizers` WordLevel .json of the fairseq dictionary, for
  word perplexities comparable to the paper), 512-token samples without sentence breaks,
  128 samples (65,536 tokens) per update, 100,000 updates, Adam (0.9, 0.98) with decoupled
  weight decay 0.01 (fairseq's Adam = AdamW), lr 5e-4 with fairseq's inverse-square-root
  schedule after 8,000 linear warm-up steps (from 0 here, 1e-7 in fairseq), no clipping, dropout
  0.1 (the models' default), validation once per epoch, the best checkpoint by validation loss.
  The RoBERTa-style masked LMs (`transnormer_t*_mlm`) need a masked-LM task the loop does not
  have, so they have no setting here.
"""
import math

import ml_collections

from configs import common
from configs import matformer as matformer_config

# size -> (tokens seen in pre-training, peak learning rate). Tokens: [LA-paper] / model cards; the
# lr is a placeholder (LLaMA-1's for 7B and 13B; TransNormerLLM's own is unpublished).
_TNL_PRETRAINING = {
    "385m": (1.0e12, 3e-4),
    "1b": (1.2e12, 3e-4),
    "7b": (1.4e12, 3e-4),
    "15b": (2.0e12, 3e-4),
}
_TNL_SEQ_LEN = 2048
_TNL_BATCH = 2048          # sequences per update: 4M tokens

SETTINGS = (*(f"tnl_{size}" for size in _TNL_PRETRAINING), "wikitext103_t1", "wikitext103_t2",
            "tiny_shakespeare")


def get_config(arg: str = "tiny_shakespeare") -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, setting="tiny_shakespeare", tokenizer="", runlocal=False, seed=0)
  if arg.setting not in SETTINGS:
    raise ValueError(f"unknown TransNormer setting {arg.setting!r}; expected one of {SETTINGS}")
  if arg.setting == "tiny_shakespeare":
    if arg.tokenizer:
      raise ValueError("setting 'tiny_shakespeare' reads bytes (its recipe is the baseline's); "
                       f"got tokenizer={arg.tokenizer!r}")
    return matformer_config.get_config(
        f"lm_tiny_shakespeare,model=transnormer_llm_tiny,seed={arg.seed},runlocal={arg.runlocal}")
  if arg.setting.startswith("tnl_"):
    c = _tnl_pretraining(arg.setting.removeprefix("tnl_"))
  else:
    c = _transnormer_wikitext103(arg.setting.removeprefix("wikitext103_"))
  c.seed = arg.seed
  c.data.tokenizer = arg.tokenizer
  if arg.runlocal:
    c.data.seq_len = 128
    c.samples.num_tokens = 16
    c.input.batch_size = 2
    c.input.eval_batch_size = 2
    c.optimizer.accum_steps = 1
    c.total_steps = 4
    c.log_every_steps = 2
    c.eval_every_steps = 4
    c.schedule.warmup_steps = 2
  return common.with_model_keywords(c)


def _language_modeling(model: str) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.task = "language_modeling"
  c.model.name = model
  c.early_stopping.metric = "validation/loss"
  c.early_stopping.mode = "min"
  c.eval_splits = ("validation",)
  c.final_eval_splits = ("validation", "test")
  c.samples.num_tokens = 64
  return c


def _tnl_pretraining(size: str) -> ml_collections.ConfigDict:
  """TransNormerLLM-<size>: the published data facts, placeholders for the unpublished recipe."""
  tokens, lr = _TNL_PRETRAINING[size]
  c = _language_modeling(f"transnormer_llm_{size}")
  c.model.dtype = "bfloat16"             # compute; params stay f32 (AMP with bf16)
  c.data.name = ""                       # the corpus is private: name your prepared corpus
  c.data.seq_len = _TNL_SEQ_LEN
  c.input.batch_size = _TNL_BATCH
  c.input.eval_batch_size = 64
  c.optimizer.name = "adamw"
  c.optimizer.lr = lr
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip_norm = 1.0
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_steps = 2000
  c.schedule.end_lr_factor = 0.1
  c.total_steps = math.ceil(tokens / (_TNL_BATCH * _TNL_SEQ_LEN))
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  return c


def _transnormer_wikitext103(version: str) -> ml_collections.ConfigDict:
  """fairseq `train_alm.sh` for transnormer_<version> (see the module docstring)."""
  c = _language_modeling(f"transnormer_{version}")
  c.model.dtype = "bfloat16"             # compute on the accelerator; params stay f32
  c.data.name = "wikitext103"
  c.data.seq_len = 512
  c.input.batch_size = 128
  c.input.eval_batch_size = 64
  c.optimizer.name = "adamw"
  c.optimizer.lr = 5e-4
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.98
  c.optimizer.weight_decay = 0.01
  c.schedule.name = "inverse_sqrt"
  c.schedule.warmup_steps = 8000
  c.total_steps = 100_000
  c.log_every_steps = 100
  c.eval_every_steps = 0                 # once per epoch, as fairseq validates
  return c
