"""Multivariate forecasting: batch {x [B,L,N], x_mark [B,L,C] (optional), y [B,S,N]}, MSE loss.

Metrics are the official ones (iTransformer utils/metrics.py): MSE and MAE over every window,
step and variate of the standardised series, each counted equally.
"""
import jax.numpy as jnp
import numpy as np


class Forecasting:
  def model_overrides(self, meta: dict) -> dict:
    del meta  # forecasting models are independent of the number of variates
    return {}

  def example_spec(self, config, meta: dict, train: bool) -> dict:
    """{key: (shape, dtype)} of one window (split.spec's format): config.data's lengths, the data's
    variates and time marks."""
    del train  # training and evaluation windows are alike
    seq_len, pred_len, n_vars = config.data.seq_len, config.data.pred_len, meta["n_vars"]
    spec = {"x": ((seq_len, n_vars), np.float32), "y": ((pred_len, n_vars), np.float32)}
    if meta["n_marks"]:
      spec["x_mark"] = ((seq_len, meta["n_marks"]), np.float32)
    return spec

  def _predict(self, model, batch, train: bool):
    return model(batch["x"], batch.get("x_mark"), train=train).astype(jnp.float32)

  def loss(self, model, batch):
    error = self._predict(model, batch, train=True) - batch["y"]
    return jnp.mean(jnp.square(error)), {}

  def eval_sums(self, model, batch):
    error = self._predict(model, batch, train=False) - batch["y"]
    weight = batch["mask"][:, None, None]
    count = jnp.sum(batch["mask"]) * error.shape[1] * error.shape[2]
    return {"mse": (jnp.sum(weight * jnp.square(error)), count),
            "mae": (jnp.sum(weight * jnp.abs(error)), count)}
