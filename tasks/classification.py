"""Classification: batch {image [B,H,W,C] float, label [B] int}, softmax cross-entropy.

A training batch may also carry 'soft_label' [B, num_classes] (rows summing to 1: Mixup/CutMix and
label smoothing, made by data/augment.py); the loss is then the cross-entropy with those targets,
and training accuracy still compares the argmax with the hard 'label'. Evaluation uses hard labels.
"""
import jax.numpy as jnp
import numpy as np
import optax

from data.augment import ImageOptions


class Classification:
  def model_overrides(self, meta: dict) -> dict:
    return {"num_classes": meta["num_classes"]}

  def example_spec(self, config, meta: dict, train: bool) -> dict:
    """{key: (shape, dtype)} of one example of a batch (split.spec's format) from the config and
    the data's meta: the image as config.input resizes and converts it, soft labels when mixed or
    smoothed (training)."""
    height, width, channels = meta["image_shape"]
    size = config.input.image_size
    if not size and height is None:
      raise ValueError("images of varying sizes need config.input.image_size > 0, got 0")
    image = (size or height, size or width, config.input.channels or channels)
    spec = {"image": (image, np.float32), "label": ((), np.int32)}
    if train and ImageOptions.from_config(config.input).soft_labels:
      spec["soft_label"] = ((meta["num_classes"],), np.float32)
    return spec

  def _logits(self, model, batch, train: bool):
    return model(batch["image"], train=train).astype(jnp.float32)

  def loss(self, model, batch):
    logits = self._logits(model, batch, train=True)
    if "soft_label" in batch:
      losses = optax.softmax_cross_entropy(logits, batch["soft_label"])
    else:
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses.mean(), {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

  def eval_sums(self, model, batch):
    logits = self._logits(model, batch, train=False)
    mask = batch["mask"]
    count = jnp.sum(mask)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = jnp.argmax(logits, -1) == batch["label"]
    return {"loss": (jnp.sum(mask * loss), count), "accuracy": (jnp.sum(mask * correct), count)}
