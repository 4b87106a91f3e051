"""Configs: every setting builds and names a registered model; bad flags are refused with a message."""
import inspect
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
from configs import hornet as hornet_config
from configs import itransformer as itransformer_config
from configs import matformer as matformer_config
from configs import maxvit as maxvit_config
from configs import transnormer as transnormer_config
from data import catalog
from models.maxvit import MaxViT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITRANSFORMER_SETTINGS = [f"{d}_{h}" for d in ("etth1", "etth2", "ettm1", "ettm2", "weather", "exchange", "ecl",
                                               "traffic", "solar") for h in (96, 192, 336, 720)] + \
                        [f"pems0{i}_{h}" for i in (3, 4, 7, 8) for h in (12, 24, 48, 96)]


def trace_logits(config, num_classes):
  """Builds the config's model abstractly (no weights) and traces a batch of 2 images at the
  config's image size: the model accepts that size (windows, regions, filters divide its maps)."""
  overrides = common.model_overrides(config)
  abstract = nnx.eval_shape(lambda: models.create_model(
      config.model.name, num_classes=num_classes, rngs=nnx.Rngs(0), **overrides))
  graphdef, state = nnx.split(abstract)
  size, channels = config.input.image_size, overrides.get("in_chans", 3)
  images = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)
  assert logits.shape == (2, num_classes)
  return abstract


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


@pytest.mark.parametrize("config_module, arg, message", [
    (itransformer_config, "etth9_96", "unknown iTransformer setting"),
    (itransformer_config, "etth1_96,sed=3", "unknown config argument 'sed'"),
    (itransformer_config, "etth1_96,runlocal=maybe", "must be true or false"),
    (transnormer_config, "tnl_3b", "unknown TransNormer setting"),
    (transnormer_config, "tiny_shakespeare,tokenizer=x.model", "reads bytes"),
    (transnormer_config, "wikitext103_t1,tokenizr=x.json", "unknown config argument 'tokenizr'"),
    (biformer_config, "imagenet", "unknown BiFormer setting"),
    (biformer_config, "variant=large", "variant in"),
    (hornet_config, "imagenet", "unknown HorNet setting"),
    (hornet_config, "variant=large_gf", "variant in"),
    (hornet_config, "ft384,variant=tiny_gf", "variant in"),
    (maxvit_config, "imagenet", "unknown MaxViT setting"),
    (maxvit_config, "variant=xlarge", r"variant in \('tiny', 'small', 'base', 'large'\)"),
    (maxvit_config, "finetune,variant=huge", "variant in"),
    (maxvit_config, "variant=tiny,res=256", r"res in \(224, 384, 512\)"),
    (matformer_config, "matvit_imagenet", "unknown MatFormer setting"),
], ids=lambda v: v.__name__.rsplit(".", 1)[-1] if inspect.ismodule(v) else None)
def test_bad_config_args_are_refused_with_a_message(config_module, arg, message):
  with pytest.raises(ValueError, match=message):
    config_module.get_config(arg)


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


@pytest.mark.parametrize("setting", transnormer_config.SETTINGS)
def test_every_transnormer_setting_names_a_registered_lm(setting):
  config = transnormer_config.get_config(setting)
  assert config.task == "language_modeling"
  assert config.model.name in models.list_models("transnormer*")
  if config.data.name:   # TransNormerLLM's corpus is private: left for the user to name
    assert isinstance(catalog.DATASETS[config.data.name], catalog.TextDataset)
  runlocal = transnormer_config.get_config(f"{setting},runlocal,seed=5")
  assert runlocal.seed == 5 and 0 < runlocal.total_steps <= 20
  assert runlocal.model.name == config.model.name


@pytest.mark.parametrize("size, tokens", [("385m", 1.0e12), ("1b", 1.2e12), ("7b", 1.4e12),
                                          ("15b", 2.0e12)])
def test_tnl_pretraining_settings(size, tokens):
  config = transnormer_config.get_config(f"tnl_{size},tokenizer=/t/tokenizer.model")
  assert config.model.name == f"transnormer_llm_{size}" and config.model.dtype == "bfloat16"
  assert config.data.seq_len == 2048 and config.data.tokenizer == "/t/tokenizer.model"
  seen = config.total_steps * config.input.batch_size * config.data.seq_len
  assert tokens <= seen < tokens + config.input.batch_size * config.data.seq_len


@pytest.mark.parametrize("version, kernel", [("t1", "elu"), ("t2", "1+elu")])
def test_transnormer_v1_wikitext103_is_train_alm(version, kernel):
  config = transnormer_config.get_config(f"wikitext103_{version}")
  assert models.model_info(config.model.name).defaults["kernel"] == kernel
  assert (config.data.name, config.data.seq_len) == ("wikitext103", 512)
  assert config.input.batch_size == 128
  optimizer = config.optimizer
  assert (optimizer.lr, optimizer.b2, optimizer.weight_decay) == (5e-4, 0.98, 0.01)
  assert (config.schedule.name, config.schedule.warmup_steps) == ("inverse_sqrt", 8000)
  assert config.total_steps == 100_000 and config.optimizer.clip_norm == 0.0


F32 = {"dtype": "float32", "param_dtype": "float32"}


def test_tnl_tiny_shakespeare_is_the_softmax_baselines_recipe():
  """Same data, tokens, recipe and seed as configs/matformer.py:lm_tiny_shakespeare; only the model
  differs, and the two models have the same size (within 0.2 %)."""
  for arg in ("", ",runlocal,seed=3"):
    ours = transnormer_config.get_config("tiny_shakespeare" + arg).to_dict()
    baseline = matformer_config.get_config("lm_tiny_shakespeare" + arg).to_dict()
    ours_model, baseline_model = ours.pop("model"), baseline.pop("model")
    assert ours_model["name"] == "transnormer_llm_tiny" and baseline_model["name"] == "transformer_lm_tiny"
    for model in (ours_model, baseline_model):  # the variant's own values
      assert {k: v for k, v in model.items() if v is not None} == {"name": model["name"], **F32}
    assert ours == baseline
  sizes = [models.count_params(nnx.eval_shape(
      lambda n=name: models.create_model(n, rngs=nnx.Rngs(0))))
      for name in ("transnormer_llm_tiny", "transformer_lm_tiny")]
  assert sizes == [901_248, 900_128] and abs(sizes[0] / sizes[1] - 1) < 0.002


BIFORMER_SETTINGS = ["in1k,variant=tiny", "variant=small", "variant=base", "fashion_mnist"]


@pytest.mark.parametrize("arg", BIFORMER_SETTINGS)
def test_every_biformer_setting_builds_its_model_at_its_image_size(arg):
  config = biformer_config.get_config(arg)
  assert config.model.name in models.list_models("biformer*")
  trace_logits(config, 10 if config.data.name == "fashion_mnist" else 1000)


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


HORNET_SETTINGS = (
    [f"in1k,variant={v}" for v in ("tiny_7x7", "tiny_gf", "small_7x7", "small_gf", "base_7x7",
                                   "base_gf")]
    + [f"{s},variant={v}" for s in ("in22k", "ft384") for v in ("large_7x7", "large_gf")]
    + ["fashion_mnist", "fashion_mnist,variant=tiny_gf"])


@pytest.mark.parametrize("arg", HORNET_SETTINGS)
def test_every_hornet_setting_builds_its_model_at_its_image_size(arg):
  config = hornet_config.get_config(arg)
  assert config.model.name in models.list_models("hornet*")
  abstract = trace_logits(config, 10 if config.data.name == "fashion_mnist" else 1000)
  if "gf" in config.model.name:  # the GF filters are sized for the config's maps: no resize
    grids = abstract.stages[2][0].gnconv.dwconv.complex_weight.shape[:2]
    assert grids == (config.input.image_size // 16, config.input.image_size // 32 + 1)
  runlocal = hornet_config.get_config(f"{arg},runlocal,seed=3")
  assert runlocal.total_steps == 4 and runlocal.seed == 3 and runlocal.model == config.model


def test_hornet_official_recipe_numbers():
  """TRAINING.md's commands through the official main.py's defaults."""
  recipes = {v: hornet_config.get_config(f"variant={v}") for v in ("tiny_7x7", "tiny_gf",
                                                                     "small_gf", "base_gf")}
  tiny = recipes["tiny_gf"]
  assert tiny.input.batch_size == 4096 and tiny.optimizer.lr == 4e-3 and tiny.num_epochs == 300
  assert tiny.schedule.warmup_steps == 20 * (1_281_167 // 4096)
  assert tiny.optimizer.lr * tiny.schedule.end_lr_factor == pytest.approx(1e-6)
  assert (tiny.optimizer.weight_decay, tiny.input.label_smoothing) == (0.05, 0.1)
  assert (tiny.input.mixup.mixup_alpha, tiny.input.mixup.cutmix_alpha) == (0.8, 1.0)
  assert [recipes[v].optimizer.clip_norm for v in recipes] == [100.0, 1.0, 1.0, 1.0]
  assert [recipes[v].input.randaugment.magnitude for v in recipes] == [9.0, 9.0, 12.0, 15.0]
  assert models.model_info("hornet_base_gf").defaults["drop_path_rate"] == 0.5
  pretrain = hornet_config.get_config("in22k,variant=large_7x7")
  assert (pretrain.num_epochs, pretrain.optimizer.weight_decay, pretrain.optimizer.clip_norm,
          pretrain.eval_splits) == (90, 0.1, 5.0, ())
  finetune = hornet_config.get_config("ft384,variant=large_gf")
  assert finetune.model.name == "hornet_large_gf_384" and finetune.model.drop_path_rate == 0.4
  assert (finetune.input.batch_size, finetune.optimizer.lr, finetune.optimizer.weight_decay,
          finetune.num_epochs, finetune.schedule.warmup_steps) == (512, 5e-5, 1e-8, 30, 0)
  assert finetune.input.mixup.mixup_alpha == finetune.input.mixup.cutmix_alpha == 0.0
  assert finetune.input.crop_pct == 1.0 and finetune.init_from.dont_load == ("head/.*",)


MAXVIT_SETTINGS = ([f"variant={v},res={r}" for v in ("tiny", "small", "base", "large")
                    for r in (224, 384, 512)]
                   + ["fashion_mnist"]
                   + [f"finetune,variant={v},res={r}" for v in ("tiny", "small", "base", "large",
                                                                "xlarge") for r in (224, 384, 512)]
                   + ["finetune,data=digits", "finetune,data=image_folder"])


@pytest.mark.parametrize("arg", MAXVIT_SETTINGS)
def test_every_maxvit_setting_names_its_model_at_its_image_size(arg):
  config = maxvit_config.get_config(arg)
  info = models.model_info(config.model.name)
  assert info.family == "maxvit"
  overrides = common.model_overrides(config)
  assert set(overrides) <= set(inspect.signature(MaxViT.__init__).parameters)
  kwargs = {**info.defaults, **overrides}
  # MaxViT takes no padding: the input is a multiple of 2^(stages + 1) x window
  window = kwargs.get("window_size") or kwargs["img_size"] // 32
  assert config.input.image_size == kwargs["img_size"]
  assert config.input.image_size % (2 ** (len(kwargs["depths"]) + 1) * window) == 0
  assert config.input.channels in (0, kwargs.get("in_chans", 3))
  runlocal = maxvit_config.get_config(f"{arg},runlocal,seed=5")
  assert runlocal.seed == 5 and runlocal.total_steps == 4
  assert runlocal.model.to_dict() == config.model.to_dict()


@pytest.mark.parametrize("arg", ["fashion_mnist", "variant=tiny,res=384"])
def test_maxvit_settings_trace_at_their_image_size(arg):
  trace_logits(maxvit_config.get_config(arg), 10)


def test_maxvit_official_recipe_numbers():
  scratch = maxvit_config.get_config("variant=tiny,res=224")
  assert scratch.model.name == "maxvit_tiny_tf_224" and scratch.data.name == "imagenet2012"
  assert (scratch.input.batch_size, scratch.num_epochs) == (4096, 300)
  assert (scratch.optimizer.name, scratch.optimizer.lr) == ("adamw", 3e-3)
  assert scratch.optimizer.lr * scratch.schedule.end_lr_factor == pytest.approx(1e-5)
  assert (scratch.schedule.name, scratch.schedule.warmup_steps) == ("warmup_cosine", 10_000)
  assert (scratch.optimizer.weight_decay, scratch.optimizer.clip_norm) == (0.05, 1.0)
  ra, mix = scratch.input.randaugment, scratch.input.mixup
  assert (ra.num_layers, ra.magnitude, ra.prob, ra.exclude_ops) == (2, 15.0, 1.0, ())
  assert (mix.mixup_alpha, mix.cutmix_alpha, scratch.input.label_smoothing) == (0.8, 0.0, 0.1)
  assert scratch.input.mean == common.IMAGENET_MEAN and scratch.input.crop_pct == 224 / 256
  finetune = maxvit_config.get_config("variant=base,res=512")
  assert finetune.model.name == "maxvit_base_tf_512" and finetune.model.rel_pos_size == 13
  assert (finetune.input.batch_size, finetune.num_epochs) == (512, 30)
  assert (finetune.optimizer.lr, finetune.schedule.name) == (5e-5, "constant")
  assert finetune.optimizer.weight_decay == 1e-8 and finetune.input.mean == (0.5,)
  assert finetune.init_from.dont_load == ("head/(pre_logits|fc)/.*",)
  assert finetune.input.crop_pct == 512 / 544
  fmnist = maxvit_config.get_config("fashion_mnist")
  assert fmnist.eval_splits == fmnist.final_eval_splits == ("test",)
  # The recipe of the run reported in RESULTS.md (91.04 % test): 4 x 234 steps of 256 images.
  assert (fmnist.input.batch_size, fmnist.num_epochs, fmnist.optimizer.lr) == (256, 4, 3e-3)
  assert (fmnist.schedule.name, fmnist.schedule.warmup_steps) == ("warmup_cosine", 100)


def test_matvit_fashion_mnist_is_the_reported_recipe():
  """The run in RESULTS.md (S/M/L/XL 85.6-85.9 %): the shared Fashion-MNIST recipe at 28 x 28,
  no crops, 3 epochs of batch 64, lr 3e-3, the granularities' losses summed."""
  c = matformer_config.get_config("matvit_fashion_mnist")
  assert c.model.name == "matvit_nano_patch4_28" and c.nested.objective == "sum"
  assert (c.input.image_size, c.input.train_crop, c.input.hflip) == (28, "resize", 0.5)
  assert (c.input.batch_size, c.num_epochs, c.optimizer.lr) == (64, 3, 3e-3)
  assert (c.optimizer.clip_norm, c.schedule.warmup_steps) == (1.0, 312)
  assert c.eval_splits == c.final_eval_splits == ("test",)


# Mixed precision: the accelerator recipes (ImageNet, LM pre-training) compute in bfloat16, the
# CPU recipes in float32 (common.base_config's default); every recipe keeps f32 weights.
_MATFORMER_CPU = ("lm_tiny_shakespeare", "matlm_tiny_shakespeare", "matvit_fashion_mnist")
BF16_RECIPES = (
    [(hornet_config, arg) for arg in HORNET_SETTINGS if not arg.startswith("fashion_mnist")]
    + [(maxvit_config, arg) for arg in MAXVIT_SETTINGS if arg != "fashion_mnist"]
    + [(biformer_config, arg) for arg in BIFORMER_SETTINGS if arg != "fashion_mnist"]
    + [(transnormer_config, s) for s in transnormer_config.SETTINGS if s != "tiny_shakespeare"]
    + [(matformer_config, f"matlm_olmo_{size}") for size in ("180m", "460m", "1300m")])
F32_RECIPES = (
    [(hornet_config, "fashion_mnist"), (hornet_config, "fashion_mnist,variant=tiny_gf"),
     (maxvit_config, "fashion_mnist"), (biformer_config, "fashion_mnist"),
     (transnormer_config, "tiny_shakespeare")]
    + [(matformer_config, setting) for setting in _MATFORMER_CPU]
    + [(itransformer_config, setting) for setting in ITRANSFORMER_SETTINGS + ["digits"]])


def test_accelerator_recipes_compute_in_bfloat16_and_cpu_recipes_in_float32():
  def dtypes(config_module, arg):
    model = config_module.get_config(arg).model
    return model.dtype, model.param_dtype

  expected = ([(recipe, ("bfloat16", "float32")) for recipe in BF16_RECIPES]
              + [(recipe, ("float32", "float32")) for recipe in F32_RECIPES])
  wrong = [(module.__name__, arg, dtypes(module, arg)) for (module, arg), want in expected
           if dtypes(module, arg) != want]
  assert len(BF16_RECIPES) == 51 and len(F32_RECIPES) == 61
  assert not wrong


def test_every_recipe_lists_exactly_its_models_keywords():
  # Each keyword is then a command-line override: --config.model.<keyword>=...
  wrong = []
  for module, arg in BF16_RECIPES + F32_RECIPES:
    model = module.get_config(arg).model
    if set(model) != {"name", *models.model_keywords(model.name)}:
      wrong.append((module.__name__, arg, set(model) ^ {"name", *models.model_keywords(model.name)}))
  assert not wrong
