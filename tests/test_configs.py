"""Configs: every setting builds and names a registered model; bad flags are refused with a message."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import models
from configs import biformer as biformer_config
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


BIFORMER_SETTINGS = ["in1k,variant=tiny", "variant=small", "variant=base", "fashion_mnist"]


@pytest.mark.parametrize("arg", BIFORMER_SETTINGS)
def test_every_biformer_setting_builds_its_model_at_its_image_size(arg):
  config = biformer_config.get_config(arg)
  assert config.model.name in models.list_models("biformer*")
  overrides = {k: v for k, v in config.model.items() if k != "name"}
  num_classes = 10 if config.data.name == "fashion_mnist" else 1000
  abstract = nnx.eval_shape(lambda: models.create_model(
      config.model.name, num_classes=num_classes, rngs=nnx.Rngs(0), **overrides))
  graphdef, state = nnx.split(abstract)
  channels = config.model.get("in_chans", 3)
  images = jax.ShapeDtypeStruct((2, config.input.image_size, config.input.image_size, channels),
                                jnp.float32)
  # The forward traces: n_win divides every routed stage's map at the config's image size.
  logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)
  assert logits.shape == (2, num_classes)


def test_biformer_official_recipe_numbers():
  tiny, small, base = (biformer_config.get_config(f"variant={v}")
                       for v in ("tiny", "small", "base"))
  assert [c.model.drop_path_rate for c in (tiny, small, base)] == [0.1, 0.15, 0.4]
  assert tiny.input.batch_size == 1024 and tiny.optimizer.lr == pytest.approx(1e-3)
  assert tiny.schedule.warmup_steps == 5 * (1_281_167 // 1024) and tiny.num_epochs == 300
  assert tiny.optimizer.lr * tiny.schedule.end_lr_factor == pytest.approx(1e-5)
  assert tiny.input.randaugment.magnitude == 9.0 and tiny.input.mixup.cutmix_alpha == 1.0
  assert tiny.input.crop_pct == 0.875 and tiny.input.label_smoothing == 0.1
  fmnist = biformer_config.get_config("fashion_mnist,runlocal,seed=5")
  assert fmnist.total_steps == 4 and fmnist.seed == 5 and fmnist.eval_splits == ("test",)


@pytest.mark.parametrize("arg, message", [
    ("imagenet", "unknown BiFormer setting"),
    ("variant=large", "variant in"),
])
def test_bad_biformer_args(arg, message):
  with pytest.raises(ValueError, match=message):
    biformer_config.get_config(arg)
