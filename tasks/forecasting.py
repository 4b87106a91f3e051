"""Multivariate forecasting: batch {x [B,L,N], x_mark [B,L,C] (optional), y [B,S,N]}, MSE loss.

Metrics are the official ones (iTransformer utils/metrics.py): MSE and MAE over every window,
step and variate of the standardised series, each counted equally.
"""
import jax.numpy as jnp


class Forecasting:
  def model_overrides(self, meta: dict) -> dict:
    del meta  # forecasting models are independent of the number of variates
    return {}

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
