"""The language-model task: tokenizers (bytes, SentencePiece and HF files), packing, the tiny
Shakespeare and WikiText-2 builders on the real files, batches, the loss and metrics, and a tiny
LM trained and evaluated end to end through train.py and eval.py."""
from __future__ import annotations

import importlib
import math
import os
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx

import data
import eval as eval_lib
import tasks
import train
from configs import matformer as matformer_config
from conftest import tensorboard_events
from data import prepare, text, tokenizers
from models.matformer import MatLM

SHAKESPEARE_SPLITS = {"train": 1_003_854, "validation": 55_770, "test": 55_770}   # TFDS 90/5/5
WIKITEXT2_BYTES = {"validation": 1_121_681, "test": 1_256_449}


@pytest.fixture(scope="module")
def raw_dir() -> pathlib.Path:
  if not os.environ.get("ZOO_TEST_DATA"):
    pytest.skip("ZOO_TEST_DATA (the shared/data folder of real benchmark files) is not set")
  return pathlib.Path(os.environ["ZOO_TEST_DATA"])


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def shakespeare_text(raw_dir) -> str:
  return (raw_dir / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")


def _config_data(raw_dir, tfds_dir, name="tiny_shakespeare", folder="tiny_shakespeare", **keys):
  return {"name": name, "data_dir": tfds_dir, "manual_dir": str(raw_dir / folder),
          "seq_len": 256, "tokenizer": "byte", **keys}


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
  tok = tokenizers.get_tokenizer("byte")
  ids = tok.encode("Ærø, naïve — ok\n")
  assert tok.vocab_size == 256 and tok.name == "byte" and ids.dtype == np.int32
  assert len(ids) == len("Ærø, naïve — ok\n".encode("utf-8")) == 21
  assert tok.decode(ids) == "Ærø, naïve — ok\n"
  with pytest.raises(ValueError, match="byte tokens are 0..255"):
    tok.decode([3, 256])


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory, shakespeare_text):
  """A SentencePiece BPE model and an HF tokenizers BPE file trained on 100 KB of Shakespeare."""
  import sentencepiece
  import tokenizers as hf
  folder = tmp_path_factory.mktemp("tokenizers")
  sample = shakespeare_text[:100_000]
  (folder / "sample.txt").write_text(sample, encoding="utf-8")
  sentencepiece.SentencePieceTrainer.train(
      input=str(folder / "sample.txt"), model_prefix=str(folder / "shakespeare"), vocab_size=300,
      model_type="bpe", character_coverage=1.0, minloglevel=2)
  bpe = hf.Tokenizer(hf.models.BPE(unk_token="[UNK]"))
  bpe.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = hf.decoders.ByteLevel()
  bpe.train_from_iterator([sample], hf.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["[UNK]"],
      initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
  bpe.save(str(folder / "tokenizer.json"))
  return folder / "shakespeare.model", folder / "tokenizer.json"


def test_sentencepiece_and_hf_tokenizer_files(tokenizer_files, shakespeare_text):
  spm_path, hf_path = tokenizer_files
  spm, hf = tokenizers.get_tokenizer(str(spm_path)), tokenizers.get_tokenizer(str(hf_path))
  assert spm.vocab_size == 300 and hf.vocab_size == 400
  assert spm.name.startswith("spm_shakespeare_") and len(spm.name) == len("spm_shakespeare_") + 8
  assert hf.name.startswith("hf_tokenizer_")
  lines = shakespeare_text[200_000:203_000]
  # byte-level BPE is lossless; SentencePiece keeps each line's text (its newlines are whitespace)
  assert hf.decode(hf.encode(lines)) == lines
  spm_ids = spm.encode(lines)
  assert spm.decode(spm_ids).split() == lines.split()
  # subwords: fewer tokens than bytes, and line-wise encoding equals encoding each line
  assert len(spm_ids) < 0.6 * len(lines) and len(hf.encode(lines)) < 0.6 * len(lines)
  per_line = np.concatenate([spm.encode(line) for line in lines.splitlines(keepends=True)])
  np.testing.assert_array_equal(spm_ids, per_line)


def test_tokenizer_errors(tmp_path, monkeypatch, tokenizer_files):
  with pytest.raises(data.DataError, match="expected 'byte', a SentencePiece .model file"):
    tokenizers.get_tokenizer("gpt2")
  with pytest.raises(data.DataError, match="not found"):
    tokenizers.get_tokenizer(str(tmp_path / "missing.model"))
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(data.DataError, match="not a readable Hugging Face tokenizers file"):
    tokenizers.get_tokenizer(str(tmp_path / "broken.json"))
  real_import = importlib.import_module

  def no_sentencepiece(name, *args):
    if name == "sentencepiece":
      raise ImportError(name)
    return real_import(name, *args)

  monkeypatch.setattr(importlib, "import_module", no_sentencepiece)
  with pytest.raises(data.DataError, match="pip install sentencepiece"):
    tokenizers.get_tokenizer(str(tokenizer_files[0]))


# ----------------------------------------------------------------------------- packing, builders


def test_pack_predicts_every_token_but_the_first_once():
  records, num_tokens = text.pack(np.arange(10, 20, dtype=np.int32), 4)
  np.testing.assert_array_equal(records, [[10, 11, 12, 13, 14], [14, 15, 16, 17, 18],
                                          [18, 19, 0, 0, 0]])
  np.testing.assert_array_equal(num_tokens, [5, 5, 2])
  split = data.TokenSplit(records, num_tokens, {"bytes_per_token": 1.5})
  batch = split.gather(np.arange(3))
  targets = batch["tokens"][:, 1:][batch["weights"] > 0]
  np.testing.assert_array_equal(targets, np.arange(11, 20))
  np.testing.assert_allclose(batch["num_bytes"], [6.0, 6.0, 1.5])
  with pytest.raises(data.DataError, match="nothing to predict"):
    text.pack(np.zeros(1, np.int32), 4)


def test_tiny_shakespeare_bytes(raw_dir, tfds_dir, shakespeare_text):
  splits = {name: data.load(_config_data(raw_dir, tfds_dir), name) for name in SHAKESPEARE_SPLITS}
  for name, size in SHAKESPEARE_SPLITS.items():
    split = splits[name]
    assert split.meta["num_tokens"] == split.meta["num_bytes"] == size   # ASCII: 1 byte per char
    assert split.meta["bytes_per_token"] == 1.0 and split.meta["vocab_size"] == 256
    assert len(split) == -(-(size - 1) // 256)
  # the stored records are the file's bytes, in order, split as TFDS does (90 / 5 / 5 %)
  validation = splits["validation"]
  stream = np.concatenate([validation.tokens[:, :-1].ravel(), validation.tokens[-1:, -1]])
  start = SHAKESPEARE_SPLITS["train"]
  expected = np.frombuffer(shakespeare_text[start:start + 55_770].encode(), np.uint8)
  np.testing.assert_array_equal(stream[:55_770], expected)
  assert validation.num_tokens[-1] == 55_770 - 256 * (len(validation) - 1)
  assert np.all(stream[55_770:] == 0)


def test_wikitext2_without_its_train_file(raw_dir, tfds_dir):
  config = _config_data(raw_dir, tfds_dir, name="wikitext2", folder="wikitext2", seq_len=512)
  for name, size in WIKITEXT2_BYTES.items():
    split = data.load(config, name)
    assert split.meta["num_bytes"] == split.meta["num_tokens"] == size   # the files' sizes
  with pytest.raises(data.DataError, match="has no split 'train'.*wiki.train.tokens"):
    data.load(config, "train")


def test_subword_dataset_counts_bytes_per_token(raw_dir, tfds_dir, tokenizer_files):
  config = _config_data(raw_dir, tfds_dir, tokenizer=str(tokenizer_files[1]), seq_len=64)
  split = data.load(config, "validation")
  assert split.meta["tokenizer"].startswith("hf_tokenizer_") and split.meta["vocab_size"] == 400
  assert split.meta["num_bytes"] == 55_770 and split.meta["num_tokens"] < 0.7 * 55_770
  np.testing.assert_allclose(split.meta["bytes_per_token"], 55_770 / split.meta["num_tokens"])
  batch = split.gather(np.arange(len(split)))
  np.testing.assert_allclose(batch["num_bytes"].sum(),
                             (split.meta["num_tokens"] - 1) * split.meta["bytes_per_token"],
                             rtol=1e-6)


def test_not_prepared_and_missing_files(raw_dir, tmp_path, capsys):
  config = {"name": "tiny_shakespeare", "data_dir": str(tmp_path), "seq_len": 128}
  with pytest.raises(data.DataError, match="--tokenizer byte --seq_len 128"):
    data.load(config, "train")
  with pytest.raises(data.DataError, match="needs a sequence length"):
    data.load({**config, "seq_len": 0}, "train")
  # An explicit data_dir: the default (~/tensorflow_datasets) may already hold a prepared copy.
  cli = ["tiny_shakespeare", "--manual_dir", str(tmp_path), "--data_dir", str(tmp_path / "tfds")]
  assert prepare.main(cli) == 2
  assert "input.txt not found" in capsys.readouterr().err
  (tmp_path / "input.txt").write_text("To be, or not to be\n")
  assert prepare.main(cli) == 2
  assert "20 characters, but the published file has 1115394" in capsys.readouterr().err


def test_prepare_cli(raw_dir, tmp_path, capsys):
  args = ["tiny_shakespeare", "--manual_dir", str(raw_dir / "tiny_shakespeare"), "--data_dir",
          str(tmp_path), "--seq_len", "1024"]
  assert prepare.main(args) == 0
  out = capsys.readouterr().out
  assert "zoo_text/tiny_shakespeare_byte_s1024" in out
  assert "train 981, validation 55, test 55" in out


def test_train_batches_resume_through_grain(raw_dir, tfds_dir, tmp_path):
  split = data.load(_config_data(raw_dir, tfds_dir), "train")
  iterator = iter(data.train_batches(split, 8, seed=3))
  for _ in range(2):
    next(iterator)
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path),
                                            args=grain.checkpoint.CheckpointSave(iterator))
  expected = next(iterator)
  restored = grain.checkpoint.CheckpointHandler().restore(
      epath.Path(tmp_path),
      args=grain.checkpoint.CheckpointRestore(iter(data.train_batches(split, 8, seed=3))))
  batch = next(restored)
  assert batch.keys() == {"tokens", "weights", "num_bytes"}
  for key in batch:
    np.testing.assert_array_equal(batch[key], expected[key])
  assert batch["tokens"].shape == (8, 257) and batch["tokens"].dtype == np.int32


# ----------------------------------------------------------------------------- task


def test_loss_and_eval_sums_weight_out_padding():
  model = MatLM(vocab_size=16, dim=16, depth=1, num_heads=2, mlp_dim=32, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (3, 9), 0, 16)
  weights = np.ones((3, 8), np.float32)
  weights[2, 5:] = 0                                   # a split's last, padded sequence
  batch = {"tokens": tokens, "weights": jnp.asarray(weights),
           "num_bytes": jnp.asarray(weights.sum(1) * 2.0), "mask": jnp.asarray([1.0, 0.0, 1.0])}
  logits = np.asarray(model(tokens[:, :-1]), np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, np.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
  task = tasks.get_task("language_modeling")
  loss, aux = task.loss(model, batch)
  np.testing.assert_allclose(loss, (nll * weights).sum() / weights.sum(), rtol=1e-5)
  sums = jax.device_get(task.eval_sums(model, batch))
  real = weights * np.array([1, 0, 1])[:, None]       # example 1 is eval padding (mask 0)
  np.testing.assert_allclose(sums["loss"], ((nll * real).sum(), real.sum()), rtol=1e-5)
  np.testing.assert_allclose(sums["bits_per_byte"],
                             ((nll * real).sum() / math.log(2), 2.0 * real.sum()), rtol=1e-5)
  metrics = tasks.finalize(sums, task)
  np.testing.assert_allclose(metrics["perplexity"], math.exp(metrics["loss"]), rtol=1e-12)
  np.testing.assert_allclose(metrics["bits_per_byte"], metrics["loss"] / math.log(2) / 2.0,
                             rtol=1e-6)
  assert 0.0 <= float(aux["accuracy"]) <= 1.0


def _tiny_lm_config(raw_dir, tfds_dir):
  config = matformer_config.get_config("lm_tiny_shakespeare")
  config.unlock()
  config.model.update(dim=64, depth=1, num_heads=4, mlp_dim=128)
  config.data.update(data_dir=tfds_dir, manual_dir=str(raw_dir / "tiny_shakespeare"),
                     seq_len=64)
  config.input.batch_size = 16
  config.input.eval_batch_size = 256
  config.total_steps = 200
  config.eval_every_steps = 100
  config.log_every_steps = 100
  config.schedule.warmup_steps = 10
  config.optimizer.lr = 1e-2
  config.checkpoint.async_save = False
  config.final_eval_splits = ("validation",)
  config.samples.num_tokens = 24
  config.samples.prompts = ("ROMEO:",)
  config.lock()
  return config


def test_tiny_lm_trains_and_evaluates_end_to_end(raw_dir, tfds_dir, tmp_path):
  config = _tiny_lm_config(raw_dir, tfds_dir)
  final = train.train_and_evaluate(config, str(tmp_path))
  loss = final["validation/loss"]
  # below a uniform byte (5.55 nats) and the bytes' unigram entropy (3.31 nats on this text)
  assert loss < 2.7
  np.testing.assert_allclose(final["validation/perplexity"], math.exp(loss), rtol=1e-9)
  np.testing.assert_allclose(final["validation/bits_per_byte"], loss / math.log(2), rtol=1e-6)
  assert final["validation/accuracy"] > 0.25
  # A sample at each evaluation, logged as text: the prompt and 24 new bytes.
  sample = tensorboard_events(tmp_path / "tensorboard")["texts"]["samples/0"].strip("`\n")
  assert sample.startswith("ROMEO:") and len(sample.encode()) >= len("ROMEO:") + 12, sample
  config.unlock()
  config.samples.prompts = ("ROMEO:", "")
  with pytest.raises(ValueError, match="config.samples.prompts: '' encodes to no tokens"):
    train.sample_prompts(config, {"tokenizer": "byte"})
  result = eval_lib.evaluate_checkpoint(config, str(tmp_path), "best", "validation")
  for key in ("loss", "perplexity", "bits_per_byte", "accuracy"):
    np.testing.assert_allclose(result[key], final[f"validation/{key}"], rtol=1e-6)
