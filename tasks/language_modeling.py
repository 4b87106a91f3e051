"""Language modelling: batch {tokens [B, L+1] int, weights [B, L], num_bytes [B]}, next-token
cross-entropy.

The model reads `tokens[:, :-1]` and predicts `tokens[:, 1:]`; `weights` (0 on the padding of a
split's last sequence) weight every target. Metrics: `loss` (mean nats per target token),
`perplexity` = exp(loss), `bits_per_byte` = the summed loss in bits over the text bytes the
targets stand for (each split's UTF-8 bytes per token: `num_bytes`; exactly 1 per token for the
byte tokenizer), and next-token `accuracy`.
"""
import math

import jax.numpy as jnp
import numpy as np
import optax


class LanguageModeling:
  def model_overrides(self, meta: dict) -> dict:
    # A prepared corpus always knows its vocabulary; data.abstract_meta may not (a tokenizer file
    # not at hand, a private corpus): the model's default vocabulary then applies.
    return {"vocab_size": meta["vocab_size"]} if "vocab_size" in meta else {}

  def example_spec(self, config, meta: dict, train: bool) -> dict:
    """{key: (shape, dtype)} of one packed sequence (split.spec's format), config.data.seq_len long."""
    del meta, train
    length = config.data.seq_len
    return {"tokens": ((length + 1,), np.int32), "weights": ((length,), np.float32),
            "num_bytes": ((), np.float32)}

  def _nll_and_correct(self, model, batch, train: bool):
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1], train=train).astype(jnp.float32)
    targets = tokens[:, 1:]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return nll, jnp.argmax(logits, -1) == targets

  def loss(self, model, batch):
    nll, correct = self._nll_and_correct(model, batch, train=True)
    weights = batch["weights"]
    count = jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.sum(weights * nll) / count, {"accuracy": jnp.sum(weights * correct) / count}

  def eval_sums(self, model, batch):
    nll, correct = self._nll_and_correct(model, batch, train=False)
    weights = batch["weights"] * batch["mask"][:, None]
    count = jnp.sum(weights)
    total = jnp.sum(weights * nll)
    return {"loss": (total, count), "accuracy": (jnp.sum(weights * correct), count),
            "bits_per_byte": (total / math.log(2), jnp.sum(batch["num_bytes"] * batch["mask"]))}

  def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
    return {"perplexity": math.exp(metrics["loss"])}
