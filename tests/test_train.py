"""The shared loop: training, schedules, multi-device equality, NaN stop, eval.py."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import models
import ops
import train
from configs import itransformer as itransformer_config
from configs import transnormer as transnormer_config
from conftest import tensorboard_events, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits_config(**overrides):
  """The quick-start config, shortened; overrides use dotted keys."""
  config = itransformer_config.get_config("digits")
  config.unlock()
  config.input.batch_size = 32
  config.log_every_steps = 10
  config.checkpoint.async_save = False
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  config.lock()
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_params(workdir):
  with train.make_checkpoint_manager(workdir, digits_config(), read_only=True) as mngr:
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  return step, restored["params"]


def run_cli(script, *args, env=None, timeout=300):
  return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, **(env or {})})


def assert_trees_equal(a, b):
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_digits_training_learns(tmp_path):
  final = train.train_and_evaluate(digits_config(num_epochs=4), str(tmp_path))
  losses = [m["train/loss"] for m in read_metrics(tmp_path) if "train/loss" in m]
  assert losses[-1] < 0.5 * losses[0]
  assert final["test/accuracy"] > 0.8  # 10 classes: chance is 0.1
  assert os.path.exists(tmp_path / "config.json")
  # TensorBoard: the scalars, the config as text and hparams against the final metrics.
  events = tensorboard_events(tmp_path / "tensorboard")
  assert json.loads(events["texts"]["config"].strip("`\n"))["model"]["name"] == "itransformer_cls_digits"
  assert events["hparams"] == ["_hparams_/experiment", "_hparams_/session_end_info",
                               "_hparams_/session_start_info"]
  perf = [m["perf/examples_per_sec"] for m in read_metrics(tmp_path) if "perf/examples_per_sec" in m]
  assert perf and min(perf) > 0
  # best = first evaluation with the highest validation accuracy; kept with the latest `keep` checkpoints
  evals = [(m["validation/accuracy"], -m["step"]) for m in read_metrics(tmp_path) if "validation/accuracy" in m]
  assert final["best_step"] == -max(evals)[1]
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  eval_steps = sorted(-s for _, s in evals)
  assert steps == sorted({*eval_steps[-2:], final["best_step"]})


def test_step_decay_is_itransformer_type1():
  config = itransformer_config.get_config("etth1_96")
  schedule = train.make_schedule(config, updates_per_epoch=100, total_updates=1000)
  lr = config.optimizer.lr
  # epochs 1 and 2 at lr, then halved every epoch (official adjust_learning_rate, lradj='type1')
  for epoch, factor in [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.25), (10, 0.5**8)]:
    np.testing.assert_allclose(schedule((epoch - 1) * 100), lr * factor, rtol=1e-6)
    np.testing.assert_allclose(schedule(epoch * 100 - 1), lr * factor, rtol=1e-6)


def test_warmup_cosine_schedule():
  config = digits_config()
  schedule = train.make_schedule(config, updates_per_epoch=10, total_updates=1000)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(config.schedule.warmup_steps), config.optimizer.lr, rtol=1e-6)
  np.testing.assert_allclose(schedule(1000), 0.0, atol=1e-9)


def test_inverse_sqrt_schedule_is_fairseqs():
  config = transnormer_config.get_config("wikitext103_t1")   # lr 5e-4, 8,000 warm-up updates
  schedule = train.make_schedule(config, updates_per_epoch=1000, total_updates=100_000)
  for update, lr in [(0, 0.0), (4000, 2.5e-4), (8000, 5e-4), (32_000, 2.5e-4), (72_000, 5e-4 / 3)]:
    np.testing.assert_allclose(schedule(update), lr, rtol=1e-6)


def test_early_stopping_patience():
  config = itransformer_config.get_config("etth1_96").early_stopping
  stopper = train.EarlyStopping(config)
  for step, value in enumerate([1.0, 0.8, 0.9, 0.85, 0.81]):
    stopper.update(step, {"validation/mse": value})
  assert stopper.best_step == 1 and stopper.best_value == 0.8 and stopper.should_stop
  restored = train.EarlyStopping(config, stopper.state())
  assert restored.state() == stopper.state()


def test_best_checkpoint_survives_a_restart(tmp_path):
  """A resumed run reopens the checkpoint directory: the best checkpoint (by EarlyStopping's
  'improved' mark) must outlive the latest-N rotation after that too."""
  config = digits_config(**{"checkpoint.keep": 2})
  assert config.early_stopping.metric

  def save(mngr, step, improved):
    mngr.save(step, metrics={"improved": improved},
              args=ocp.args.Composite(params=ocp.args.StandardSave({"w": np.full(2, step)})))
    mngr.wait_until_finished()

  with train.make_checkpoint_manager(str(tmp_path), config) as mngr:
    for step, improved in ((1, 1.0), (2, 0.0), (3, 0.0)):
      save(mngr, step, improved)
  with train.make_checkpoint_manager(str(tmp_path), config) as mngr:   # the resumed run
    save(mngr, 4, 0.0)
    assert mngr.all_steps() == [1, 3, 4]


@pytest.mark.parametrize("select_best", [False, True])
def test_final_evaluation_reuses_the_last_periodic_one(tmp_path, monkeypatch, select_best):
  """A split the last periodic evaluation already measured on the final checkpoint is not
  evaluated again; with early stopping on, the final checkpoint may be an older one, and then
  the split is evaluated on it."""
  calls = []
  evaluate = train.evaluate
  monkeypatch.setattr(train, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
  config = digits_config(num_epochs=2, eval_every_steps=20, eval_splits=("test",),
                         final_eval_splits=("test",),
                         **{"early_stopping.metric": "test/accuracy" if select_best else ""})
  final = train.train_and_evaluate(config, str(tmp_path))
  evals = [m for m in read_metrics(tmp_path) if "test/accuracy" in m and "epoch" in m]
  reused = final["best_step"] == evals[-1]["step"]
  assert select_best or reused
  assert len(calls) == len(evals) + (not reused)
  at_best = next(m for m in evals if m["step"] == final["best_step"])
  assert final["test/accuracy"] == pytest.approx(at_best["test/accuracy"], abs=1e-6)


def test_gradient_accumulation_matches_large_batch(tmp_path):
  # 2 micro batches of 16 accumulated == 1 batch of 32 (same data order), up to float noise.
  # No dropout: its masks are drawn per micro batch, so they differ between the two runs.
  common = {"optimizer.clip_norm": 0.0, "model.dropout": 0.0}
  big = train.train_and_evaluate(digits_config(total_steps=8, **common), str(tmp_path / "a"))
  accum = train.train_and_evaluate(digits_config(total_steps=16, **common, **{"optimizer.accum_steps": 2}),
                                   str(tmp_path / "b"))
  np.testing.assert_allclose(accum["test/loss"], big["test/loss"], rtol=2e-6)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = digits_config(total_steps=200, **{"optimizer.lr": 1e12, "optimizer.clip_norm": 0.0,
                                             "schedule.name": "constant", "schedule.warmup_steps": 0,
                                             "checkpoint.every_steps": 1, "log_every_steps": 1})
  with pytest.raises(train.NonFiniteLossError, match=r"at step \d+") as info:
    train.train_and_evaluate(config, str(tmp_path))
  bad_step = int(info.value.args[0].split("at step ")[1].split(";")[0])
  step, params = final_params(tmp_path)
  assert step == bad_step  # the checkpoint before the bad step (steps are counted from 0)
  assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(params))


def test_eight_devices_match_one(tmp_path):
  args = ["--config", "configs/itransformer.py:digits", "--config.total_steps=20", "--config.log_every_steps=1",
          "--config.input.batch_size=64"]
  one = run_cli("train.py", *args, f"--workdir={tmp_path / 'one'}")
  eight = run_cli("train.py", *args, f"--workdir={tmp_path / 'eight'}",
                  env={"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")})
  assert one.returncode == 0 and eight.returncode == 0, (one.stderr[-2000:], eight.stderr[-2000:])
  loss_one = [m["train/loss"] for m in read_metrics(tmp_path / "one") if "train/loss" in m]
  loss_eight = [m["train/loss"] for m in read_metrics(tmp_path / "eight") if "train/loss" in m]
  assert len(loss_one) == len(loss_eight) == 20
  np.testing.assert_allclose(loss_eight, loss_one, rtol=1e-4, atol=1e-5)


def test_eval_cli_writes_table_and_json(tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(digits_config(total_steps=30, eval_every_steps=10), str(workdir))
  final = json.loads((workdir / "final_metrics.json").read_text())
  export = tmp_path / "export"
  for which, more in (("best", []), ("latest", [f"--save_pretrained={export}"])):
    out = run_cli("eval.py", "--config", "configs/itransformer.py:digits", f"--workdir={workdir}",
                  f"--checkpoint={which}", "--split=test", *more)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/accuracy" in out.stdout
    logged = re.findall(r"(?m)^[IW]\d{4} .*", out.stderr)   # absl INFO / WARNING lines
    assert not logged, logged[:3]                             # orbax's 36 of them, before
  # --save_pretrained: the evaluated weights as a weights directory, the metrics in its config
  saved = json.loads((export / "config.json").read_text())
  assert saved["architecture"] == "itransformer_cls_digits" and "digits/test accuracy" in saved["metric"]
  exported = models.create_model(f"local-dir:{export}")
  _, latest_params = final_params(workdir)
  assert_trees_equal(nnx.to_pure_dict(nnx.state(exported, nnx.Param)), latest_params)
  best = json.loads((workdir / "eval_test_best.json").read_text())
  assert best["checkpoint"] == f"step {final['best_step']}"
  np.testing.assert_allclose(best["loss"], final["test/loss"], rtol=1e-6)  # the final test used the best step
  latest = json.loads((workdir / "eval_test_latest.json").read_text())
  assert latest["checkpoint"] == "step 30"
  missing = run_cli("eval.py", "--config", "configs/itransformer.py:digits", f"--workdir={tmp_path / 'none'}")
  assert missing.returncode != 0 and "no checkpoint" in missing.stderr


def test_init_from_loads_body_and_keeps_fresh_head(tmp_path):
  source = tmp_path / "source"
  train.train_and_evaluate(digits_config(total_steps=20), str(source))
  _, source_params = final_params(source)
  # lr 0 keeps the loaded values, so the fine-tuned run's params show what init_from loaded
  frozen = {"optimizer.lr": 0.0, "schedule.name": "constant", "schedule.warmup_steps": 0,
            "init_from.path": str(source), "init_from.dont_load": ("head/.*",)}
  train.train_and_evaluate(digits_config(total_steps=2, **frozen), str(tmp_path / "tuned"))
  _, tuned_params = final_params(tmp_path / "tuned")
  assert_trees_equal(tuned_params["embed"], source_params["embed"])
  assert_trees_equal(tuned_params["blocks"], source_params["blocks"])
  assert not np.allclose(tuned_params["head"]["kernel"], source_params["head"]["kernel"])


def test_eval_batch_size_is_checked_before_training(tmp_path):
  """The Fashion-MNIST recipes' 500 on 8 devices: refused at the start, not at the first evaluation."""
  out = run_cli("train.py", "--config", "configs/itransformer.py:digits", f"--workdir={tmp_path}",
                "--config.total_steps=2", "--config.input.eval_batch_size=500", "--config.mesh.data=8",
                env={"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")})
  assert out.returncode == 1
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "input.eval_batch_size=500 must be divisible by the 8" in errors[0]
  assert "eval_batch_size=504" in errors[0]
  assert not (tmp_path / "checkpoints").exists()


def test_load_pretrained_restores_into_the_params_from_a_relative_path(tmp_path, monkeypatch):
  """Orbax restores each weight straight into the model's dtype and sharding (each host reads the
  shards its devices hold); excluded weights are never read."""
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp_lib
  from flax import nnx
  import models

  source = models.create_model("itransformer_etth2_96", rngs=nnx.Rngs(1))
  models.save_params(source, tmp_path / "params")
  target = models.create_model("itransformer_etth2_96", rngs=nnx.Rngs(2), param_dtype=jnp.bfloat16)
  fresh_head = np.asarray(target.projector.kernel[...])
  restored = []
  restore = ocp_lib.PyTreeCheckpointHandler.restore
  monkeypatch.setattr(ocp_lib.PyTreeCheckpointHandler, "restore",
                      lambda self, *a, **k: restored.append(restore(self, *a, **k)) or restored[-1])
  monkeypatch.chdir(tmp_path)
  models.load_pretrained(target, "params", dont_load=("projector/.*",))

  (tree,) = restored
  assert "projector" not in tree
  for leaf in jax.tree.leaves(tree):
    assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.bfloat16
  loaded = nnx.to_pure_dict(nnx.state(target, nnx.Param))
  expected = nnx.to_pure_dict(nnx.state(source, nnx.Param))
  np.testing.assert_array_equal(loaded["embed"]["kernel"], expected["embed"]["kernel"].astype(jnp.bfloat16))
  np.testing.assert_array_equal(loaded["projector"]["kernel"], fresh_head)


_FAULTS_OF_A_SECOND_BUFFER = """
import ctypes, resource, sys
import ops
if sys.argv[1] == "keep":
  assert ops.xla_cpu.keep_freed_memory_mapped()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20  # above glibc's largest mmap threshold (32 MiB): served by mmap by default
for _ in range(2):
  buffer = libc.malloc(size)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ctypes.memset(buffer, 1, size)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  libc.free(ctypes.c_void_p(buffer))
print(faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_not_faulted_again():
  """What XLA:CPU's per-call temporary buffer meets: a freed block of 64 MiB, allocated again."""
  def faults(mode, **env):
    out = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_SECOND_BUFFER, mode], check=True,
                         capture_output=True, text=True, cwd=os.path.dirname(train.__file__),
                         env={**os.environ, **env})
    return int(out.stdout.split()[-1])

  # By default every page is faulted again: 16,384 of 4 KiB, or 32 huge pages where transparent
  # huge pages are always on. Kept, the second buffer reuses the first one's pages; the same
  # settings as tunables (what benchmarks/models.py gives timm's process) do the same.
  default = faults("default")
  assert faults("keep") * 10 < default
  assert faults("default", GLIBC_TUNABLES=ops.xla_cpu.kept_memory_tunables()) * 10 < default


def test_a_run_says_what_it_will_do_and_what_fine_tuning_loaded(tmp_path, capsys, caplog):
  """The start-up summary (model and parameter count, data and steps, devices, workdir), the
  compile line, the fine-tuning report (loaded, kept fresh, left in the checkpoint) and where the
  outputs went."""
  source = tmp_path / "source"
  train.train_and_evaluate(digits_config(total_steps=4), str(source))
  capsys.readouterr()
  tuned = tmp_path / "tuned"
  train.train_and_evaluate(digits_config(total_steps=2, **{"init_from.path": str(source),
                                                           "init_from.dont_load": ("head/.*",)}),
                           str(tuned))
  out = capsys.readouterr().out
  model = models.create_model("itransformer_cls_digits")
  params = models.count_params(model)
  assert f"Model    itransformer_cls_digits: {params:,} parameters" in out
  assert re.search(r"Data     \w+: [\d,]+ training examples, \d+ steps an epoch at batch \d+", out)
  assert f"Workdir  {tuned}" in out and "Compiling the train step" in out
  # The config as a diff against the loop's defaults: the recipe's settings, the test's own.
  assert "Config   the recipe sets: " in out and "model.name='itransformer_cls_digits'" in out
  assert "total_steps=2" in out and "init_from.dont_load=['head/.*']" in out
  assert "the command line sets: nothing" in out
  report = re.search(r"Initialised from .*source: ([\d,]+) weights loaded\n  2 kept their fresh "
                     r"initialisation: head/bias, head/kernel\n  2 in the checkpoint, not loaded: "
                     r"head/bias, head/kernel", out)
  assert report, out
  total = len(jax.tree.leaves(nnx.state(model, models.pretrained.WEIGHTS)))
  assert int(report.group(1).replace(",", "")) == total - 2
  assert f"Outputs in {tuned}: checkpoints/" in out
  # Reading a workdir's weights warns of nothing (orbax looked for step metadata in the item).
  assert "does not exist" not in caplog.text, caplog.text


class _NormNet(nnx.Module):
  """A Linear, a BatchNorm (momentum 0.9) and dropout: the parts precise BN touches."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.0, rngs=rngs)

  def __call__(self, x, *, train=False):
    return self.dropout(self.norm(self.linear(x), use_running_average=not train),
                        deterministic=not train)


class _Task:
  def loss(self, model, batch):
    return jnp.mean(model(batch["x"], train=True) ** 2), {}


def test_recompute_batch_stats_averages_training_batches_and_keeps_the_rest(tmp_path):
  """Running mean and variance become the average over the batches of each batch's statistics
  of the layer's input; the weights, the optimizer state and the momentum stay."""
  import optax
  model = _NormNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  rng = np.random.default_rng(0)
  batches = [{"x": rng.normal(size=(16, 3)).astype(np.float32) * (i + 1) + i} for i in range(3)]
  mesh = train.make_mesh(digits_config().mesh, devices=jax.devices()[:1])
  new = train.recompute_batch_stats(nnx.jit(_Task().loss), graphdef, state, iter(batches), mesh)
  new_model, new_optimizer = nnx.merge(graphdef, new)
  hidden = [np.asarray(model.linear(jnp.asarray(b["x"]))) for b in batches]
  np.testing.assert_allclose(new_model.norm.mean[...], np.mean([h.mean(0) for h in hidden], 0),
                             rtol=1e-5)
  np.testing.assert_allclose(new_model.norm.var[...], np.mean([h.var(0) for h in hidden], 0),
                             rtol=1e-4)
  assert new_model.norm.momentum == 0.9
  assert_trees_equal(nnx.to_pure_dict(nnx.state(new_model, nnx.Param)),
                     nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert_trees_equal(nnx.to_pure_dict(nnx.state(new_optimizer)),
                     nnx.to_pure_dict(nnx.state(optimizer)))


def test_a_short_batchnorm_run_says_its_statistics_are_young():
  config = digits_config(total_steps=150)
  model = _NormNet(nnx.Rngs(0))
  note = train.young_batch_stats_note(config, model, 150)
  assert "average about the last 10 steps and this run has 150" not in (note or "")
  model.norm.momentum = 0.99
  note = train.young_batch_stats_note(config, model, 150)
  assert note and "about the last 100 steps and this run has 150" in note
  assert "--config.recompute_bn_stats=N" in note
  config.recompute_bn_stats = 4
  assert train.young_batch_stats_note(config, model, 150) is None


class _FakeWandb:
  """What train.MetricWriter calls of wandb, recorded."""

  def __init__(self):
    self.inits, self.logs, self.finished = [], [], 0
    self.util = type("util", (), {"generate_id": staticmethod(lambda: "run-id-1")})

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  def log(self, values, step):
    self.logs.append((step, values))

  def finish(self):
    self.finished += 1


def test_wandb_writer_logs_the_config_metrics_and_samples_and_resumes_its_run(tmp_path, monkeypatch):
  config = digits_config(**{"wandb.project": "zoo-tests", "wandb.mode": "offline"})
  monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
  with pytest.raises(ValueError, match=r"wandb is not installed: pip install 'jax-paper-zoo\[wandb\]'"):
    train.make_metric_writer(str(tmp_path), 0, config)
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  for start_step in (0, 20):  # a run, then its resume
    writer = train.make_metric_writer(str(tmp_path), start_step, config)
    writer.write(start_step + 10, {"train/loss": 0.5})
    writer.write_texts(start_step + 10, {"samples/0": "ROMEO: hi"})
    writer.close()
  first, resumed = fake.inits
  assert first == resumed
  assert first["project"] == "zoo-tests" and first["id"] == "run-id-1" and first["resume"] == "allow"
  assert first["mode"] == "offline" and first["name"] == tmp_path.name
  assert first["config"]["model"]["name"] == "itransformer_cls_digits"
  assert fake.logs == [(10, {"train/loss": 0.5}), (10, {"samples/0": "ROMEO: hi"}),
                       (30, {"train/loss": 0.5}), (30, {"samples/0": "ROMEO: hi"})]
  assert fake.finished == 2
  # Off by default: nothing imported, no W&B run.
  monkeypatch.setitem(sys.modules, "wandb", None)
  (tmp_path / "plain").mkdir()
  train.make_metric_writer(str(tmp_path / "plain"), 0, digits_config()).close()


def test_a_150_step_maxvit_runlocal_does_not_report_chance(tmp_path):
  """MaxViT's BatchNorm statistics (momentum 0.99) trail a short run's weights: evaluated as they
  are after 150 steps the model reads near chance; runlocal re-estimates them (precise BN)."""
  from configs import maxvit as maxvit_config
  if not os.environ.get("ZOO_TEST_DATA"):
    pytest.skip("ZOO_TEST_DATA (the shared/data folder of real benchmark files) is not set")
  config = maxvit_config.get_config("fashion_mnist,runlocal")
  config.unlock()
  config.data.manual_dir = os.path.join(os.environ["ZOO_TEST_DATA"], "fashion_mnist")
  config.data.data_dir = str(tmp_path / "tfds")
  config.total_steps = config.eval_every_steps = 150
  config.log_every_steps = 50
  config.input.eval_batch_size = 500
  config.checkpoint.async_save = False
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert config.recompute_bn_stats > 0
  # 10 classes: chance is 0.1. Measured: 0.478; 0.193 with the statistics as they are.
  assert final["test/accuracy"] > 0.35, final
