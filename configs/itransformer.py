r"""iTransformer (ICLR 2024) long-term forecasting, the official recipe of every published setting.

  python -m data.prepare ett_h1 --manual_dir ~/data/ETT-small      # once
  python train.py --config configs/itransformer.py:etth1_96 --workdir runs/itransformer_etth1_96

Settings are `<dataset>_<horizon>`: etth1, etth2, ettm1, ettm2, weather, exchange, ecl, traffic, solar
with horizons 96/192/336/720, and pems03, pems04, pems07, pems08 with 12/24/48/96. Extra args:
`runlocal` (a few steps, for a smoke run), `seed=N`. Lookback is 96 everywhere.

`digits` is the README quick start: the Time-Series-Library classification head on scikit-learn's
digits (each 8x8 image read as 8 steps of 8 variates), no download, about a minute on 2 CPU cores:

  python train.py --config configs/itransformer.py:digits --workdir runs/digits

The recipe is the official scripts': Adam, MSE, 10 epochs, lr halved every epoch from epoch 3 on
('type1'), early stopping on validation MSE with patience 3, then the best checkpoint is tested.
"""
import ml_collections

from configs import common

# dataset key -> data name, batch size, learning rate (official scripts/multivariate_forecasting/*).
# Settings that differ by horizon (PEMS07/08) are patched in get_config.
_DATASETS = {
    "etth1": ("ett_h1", 32, 1e-4),
    "etth2": ("ett_h2", 32, 1e-4),
    "ettm1": ("ett_m1", 32, 1e-4),
    "ettm2": ("ett_m2", 32, 1e-4),
    "weather": ("weather", 32, 1e-4),
    "exchange": ("exchange_rate", 32, 1e-4),
    "ecl": ("electricity", 16, 5e-4),
    "traffic": ("traffic", 16, 1e-3),
    "solar": ("solar", 32, 5e-4),
    "pems03": ("pems03", 32, 1e-3),
    "pems04": ("pems04", 32, 5e-4),
    "pems07": ("pems07", 32, 1e-3),
    "pems08": ("pems08", 32, 1e-4),
}
_NO_TIME_MARKS = ("solar", "pems03", "pems04", "pems07", "pems08")  # the official loop passes None


def get_config(arg: str = "etth1_96") -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, setting="etth1_96", runlocal=False, seed=2023)
  if arg.setting == "digits":
    return common.with_model_keywords(_digits_config(arg))
  dataset, _, horizon = arg.setting.rpartition("_")
  if dataset not in _DATASETS or not horizon.isdigit():
    raise ValueError(f"unknown iTransformer setting {arg.setting!r}; expected <dataset>_<horizon> "
                     f"with dataset in {sorted(_DATASETS)}")
  horizon = int(horizon)
  data_name, batch_size, lr = _DATASETS[dataset]
  if dataset in ("pems07", "pems08") and horizon >= 48:
    batch_size, lr = 16, 1e-3

  c = common.base_config()
  c.seed = arg.seed
  c.task = "forecasting"
  c.model.name = f"itransformer_{dataset}_{horizon}"

  c.data.name = data_name
  c.data.seq_len = 96
  c.data.pred_len = horizon
  c.data.freq = "h"                      # the official scripts keep 'h' for every dataset
  c.data.time_marks = dataset not in _NO_TIME_MARKS
  c.data.scale = True

  c.input.batch_size = batch_size
  c.input.eval_batch_size = 256

  c.optimizer.name = "adam"
  c.optimizer.lr = lr
  c.schedule.name = "step_decay"         # 'type1': epochs 1-2 at lr, then halved every epoch
  c.schedule.decay_rate = 0.5
  c.schedule.decay_every_epochs = 1
  c.schedule.decay_begin_epochs = 2

  c.num_epochs = 1 if (dataset, horizon) == ("exchange", 336) else 10
  c.log_every_steps = 100
  c.eval_splits = ("validation",)
  c.final_eval_splits = ("test",)
  c.early_stopping.metric = "validation/mse"
  c.early_stopping.mode = "min"
  c.early_stopping.patience = 3

  if arg.runlocal:
    c.num_epochs = 1
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
  return common.with_model_keywords(c)


def _digits_config(arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = common.base_config()
  c.seed = arg.seed
  c.task = "classification"
  c.model.name = "itransformer_cls_digits"
  c.data.name = "digits"                 # embedded in scikit-learn: nothing to download
  c.input.batch_size = 64
  c.input.eval_batch_size = 512
  c.optimizer.name = "adamw"
  c.optimizer.lr = 2e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 1.0
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_steps = 100
  c.num_epochs = 60
  c.log_every_steps = 50
  c.eval_every_steps = 0
  c.early_stopping.metric = "validation/accuracy"
  c.early_stopping.mode = "max"
  if arg.runlocal:
    c.num_epochs = 1
    c.total_steps = 10
    c.log_every_steps = 5
  return c
