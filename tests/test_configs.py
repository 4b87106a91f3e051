"""Configs: every setting builds and names a registered model; bad flags are refused with a message."""
import os
import subprocess
import sys

import pytest

import models
from configs import common
from configs import itransformer as itransformer_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITRANSFORMER_SETTINGS = [f"{d}_{h}" for d in ("etth1", "etth2", "ettm1", "ettm2", "weather", "exchange", "ecl",
                                               "traffic", "solar") for h in (96, 192, 336, 720)] + \
                        [f"pems0{i}_{h}" for i in (3, 4, 7, 8) for h in (12, 24, 48, 96)]


@pytest.mark.parametrize("setting", ITRANSFORMER_SETTINGS + ["digits"])
def test_every_itransformer_setting_names_a_registered_model(setting):
  config = itransformer_config.get_config(setting)
  assert config.model.name in models.list_models("itransformer*")
  if setting != "digits":
    assert config.data.pred_len == int(setting.rsplit("_", 1)[1])
    assert config.early_stopping.patience == 3 and config.optimizer.name == "adam"


def test_official_script_settings():
  assert itransformer_config.get_config("ecl_96").input.batch_size == 16
  assert itransformer_config.get_config("traffic_720").optimizer.lr == 1e-3
  assert itransformer_config.get_config("exchange_336").num_epochs == 1
  assert itransformer_config.get_config("pems08_48").input.batch_size == 16
  assert itransformer_config.get_config("pems08_12").optimizer.lr == 1e-4
  assert not itransformer_config.get_config("solar_96").data.time_marks


def test_runlocal_and_seed_args():
  config = itransformer_config.get_config("etth2_192,runlocal,seed=7")
  assert config.total_steps == 20 and config.seed == 7 and config.model.name == "itransformer_etth2_192"


@pytest.mark.parametrize("arg, message", [
    ("etth9_96", "unknown iTransformer setting"),
    ("etth1_96,sed=3", "unknown config argument 'sed'"),
    ("etth1_96,runlocal=maybe", "must be true or false"),
])
def test_bad_config_args(arg, message):
  with pytest.raises(ValueError, match=message):
    itransformer_config.get_config(arg)


def test_parse_arg_types():
  arg = common.parse_arg("tiny,runlocal,lr=0.5,steps=3", setting="", runlocal=False, lr=1.0, steps=1)
  assert (arg.setting, arg.runlocal, arg.lr, arg.steps) == ("tiny", True, 0.5, 3)


@pytest.mark.parametrize("flag, message", [
    ("--config.optimizer.lrr=0.1", "Did you mean"),
    ("--config.optimizer.lr=fast", "lr"),
    ("--config.input.batch_size=1.5", "batch_size"),
])
def test_train_cli_refuses_bad_overrides(tmp_path, flag, message):
  out = subprocess.run([sys.executable, "train.py", "--config", "configs/itransformer.py:digits",
                        f"--workdir={tmp_path}", flag], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert message in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")
