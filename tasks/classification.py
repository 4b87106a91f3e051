"""Classification: batch {image [B,H,W,C] float, label [B] int}, softmax cross-entropy."""
import jax.numpy as jnp
import optax


class Classification:
  def model_overrides(self, meta: dict) -> dict:
    return {"num_classes": meta["num_classes"]}

  def _logits(self, model, batch, train: bool):
    return model(batch["image"], train=train).astype(jnp.float32)

  def loss(self, model, batch):
    logits = self._logits(model, batch, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

  def eval_sums(self, model, batch):
    logits = self._logits(model, batch, train=False)
    mask = batch["mask"]
    count = jnp.sum(mask)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = jnp.argmax(logits, -1) == batch["label"]
    return {"loss": (jnp.sum(mask * loss), count), "accuracy": (jnp.sum(mask * correct), count)}
