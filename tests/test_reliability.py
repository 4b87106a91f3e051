"""Nothing silently wrong: damaged checkpoints, non-finite saves, a reused workdir, two runs on one
workdir and stopping signals each end in one clear line, or in a correct result."""
import errno
import glob
import json
import os
import shutil
import socket
import signal
import subprocess
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

import data
import models
import tasks
import train
from test_train import (REPO, assert_trees_equal, digits_config, final_params, read_metrics,
                        run_cli)

CHECKPOINTS = dict(total_steps=40, **{"checkpoint.every_steps": 20, "eval_every_steps": 20})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A digits run with checkpoints at steps 20 and 40."""
  workdir = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(digits_config(**CHECKPOINTS), str(workdir))
  return workdir


def _restore_latest_params(workdir):
  config = digits_config(**CHECKPOINTS)
  split = data.load(config.data, "train")
  with train.on_mesh(config) as mesh:
    (model,) = train.create_model_and_optimizer(config, split.meta, tasks.from_config(config), mesh)
    with train.make_checkpoint_manager(workdir, config, read_only=True) as mngr:
      train.restore_model_items(mngr, mngr.latest_step(), model)


def _damage(workdir, how: str) -> str:
  """Damages checkpoint 40 of `workdir` the way `how` says; returns the item it damaged."""
  step = workdir / "checkpoints" / "40"
  if how == "meta cut short":
    path = step / "meta" / "metadata"
    path.write_bytes(path.read_bytes()[:40])
    return "meta"
  if how == "one weight one ulp off":  # the item decodes, to other values
    checkpointer = ocp.StandardCheckpointer()
    params = jax.tree.map(np.array, checkpointer.restore(step / "params"))
    kernel = params["blocks"]["0"]["attn"]["qkv"]["kernel"]
    kernel[0, 0] = np.nextafter(kernel[0, 0], np.inf)
    shutil.rmtree(step / "params")
    checkpointer.save(step / "params", params)
    checkpointer.wait_until_finished()
    return "params"
  # cut short: the largest file of the item, which holds its arrays
  files = glob.glob(str(step / "params" / "ocdbt.process_0" / "d" / "*"))
  path = max(files, key=os.path.getsize)
  content = open(path, "rb").read()
  open(path, "wb").write(content[:len(content) // 2])
  return "params"


@pytest.mark.parametrize("how, refusal", [("one weight one ulp off", "is damaged"),
                                          ("params cut short", "cannot be read"),
                                          ("meta cut short", "cannot be read")])
def test_damaged_checkpoint_is_refused_with_its_step_and_the_way_out(trained, tmp_path, how,
                                                                     refusal):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  item = _damage(workdir, how)
  with pytest.raises(train.CheckpointError) as info:
    _restore_latest_params(workdir)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"checkpoint step 40 {refusal}")
  assert str(workdir / "checkpoints" / "40" / item) in message
  assert message.endswith(f"Delete {workdir / 'checkpoints' / '40'} to resume from step 20.")


def test_intact_checkpoint_restores(trained):
  _restore_latest_params(trained)


def test_a_step_left_by_a_kill_before_the_cleanup_is_removed_on_resume(trained, tmp_path):
  # A kill after step 40 was committed and before step 10 (older than the kept 20) was removed.
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  shutil.copytree(workdir / "checkpoints" / "20", workdir / "checkpoints" / "10")
  train.train_and_evaluate(digits_config(**CHECKPOINTS), str(workdir))
  assert _saved_steps(workdir) == [20, 40]


def test_nonfinite_params_are_never_saved(tmp_path):
  # An overflowing update: the loss computed before it is finite, the params after it are not.
  constant = {"schedule.name": "constant", "schedule.warmup_steps": 0}
  overflow = {**constant, "optimizer.lr": 1e39, "checkpoint.every_steps": 1, "log_every_steps": 1}
  with pytest.raises(train.NonFiniteLossError) as info:
    train.train_and_evaluate(digits_config(total_steps=20, **overflow), str(tmp_path / "fresh"))
  assert str(info.value) == ("the parameters became non-finite at step 1; stopping. "
                             "No checkpoint was saved before it.")
  assert not os.path.exists(tmp_path / "fresh" / "checkpoints" / "1")

  workdir = tmp_path / "resumed"
  train.train_and_evaluate(digits_config(total_steps=10, **constant, **{"checkpoint.every_steps": 5}),
                           str(workdir))
  with pytest.raises(train.NonFiniteLossError) as info:
    train.train_and_evaluate(digits_config(total_steps=20, **overflow), str(workdir))
  assert str(info.value).startswith("the parameters became non-finite at step 11; stopping. "
                                    "The last good checkpoint (step 10) stays in ")
  step, params = final_params(workdir)
  assert step == 10
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_resuming_with_another_model_is_refused_and_the_config_history_is_kept(trained, tmp_path,
                                                                              capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  first = (workdir / "config.json").read_text()
  # Same shapes, another architecture: two heads instead of four would load and train on.
  other = digits_config(**CHECKPOINTS, **{"model.n_heads": 2, "model.dtype": "bfloat16"})
  with pytest.raises(ValueError) as info:
    train.train_and_evaluate(other, str(workdir))
  assert str(info.value) == (
      f"{workdir} holds checkpoints of another run (config.json): model.dtype: 'float32' -> "
      "'bfloat16', model.n_heads: None -> 2. Use another --workdir, or the run's own settings.")
  assert (workdir / "config.json").read_text() == first
  assert train.config_history(str(workdir)) == [str(workdir / "config.json")]

  # The schedule and length may change: logged, and recorded beside the first config.
  longer = digits_config(**{**CHECKPOINTS, "total_steps": 45, "optimizer.lr": 1e-3})
  final = train.train_and_evaluate(longer, str(workdir))
  assert final["steps"] == 45
  assert "  changed since: optimizer.lr 0.002 -> 0.001\n" in capsys.readouterr().out
  assert (workdir / "config.json").read_text() == first
  assert train.config_history(str(workdir))[1:] == [str(workdir / "config.resume_40.json")]
  assert json.loads((workdir / "config.resume_40.json").read_text())["total_steps"] == 45
  assert train.check_resumed_config(longer, str(workdir)) == {}
  # A run saved before the zoo's configs gained a key (data.file, the model's keywords) resumes:
  # it held the default.
  saved = json.loads((workdir / "config.resume_40.json").read_text())
  del saved["data"]["file"]
  assert saved["model"]["d_ff"] is None
  saved["model"] = {k: v for k, v in saved["model"].items() if v is not None}
  (workdir / "config.resume_40.json").write_text(json.dumps(saved))
  assert train.check_resumed_config(longer, str(workdir)) == {}
  assert set(train.check_resumed_config(digits_config(**CHECKPOINTS), str(workdir))) == {
      "total_steps", "optimizer.lr"}


def test_a_second_run_on_a_workdir_is_refused_and_a_killed_one_blocks_nothing(tmp_path):
  with train.workdir_lock(str(tmp_path)):
    with pytest.raises(train.WorkdirInUseError) as info:
      train.train_and_evaluate(digits_config(total_steps=2), str(tmp_path))
  assert str(info.value) == (f"{tmp_path} is in use by pid {os.getpid()} on {socket.gethostname()};"
                             " wait for that run to end, or use another --workdir")
  assert not os.path.exists(tmp_path / "config.json")

  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time, train; lock = train.workdir_lock(sys.argv[1]); lock.__enter__(); "
      "print('held', flush=True); time.sleep(120)"), str(tmp_path)],
      cwd=REPO,
      stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert holder.stdout.readline() == "held\n"
  with pytest.raises(train.WorkdirInUseError, match=f"in use by pid {holder.pid} on "):
    train.workdir_lock(str(tmp_path)).__enter__()
  holder.kill()
  holder.wait()
  with train.workdir_lock(str(tmp_path)):  # the kernel dropped the killed run's lock
    assert (tmp_path / "train.lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


# A digits run of 600 steps, a checkpoint every 100: interrupted in many ways, each resumed run
# must end bitwise where the uninterrupted one does.
INTERRUPTED = ["--config", "configs/itransformer.py:digits", "--config.total_steps=600",
               "--config.checkpoint.every_steps=100", "--config.log_every_steps=100",
               "--config.eval_every_steps=300"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  done = run_cli("train.py", *INTERRUPTED, f"--workdir={workdir}")
  assert done.returncode == 0, done.stderr[-3000:]
  return final_params(workdir), _records(workdir)


def _records(workdir) -> list[dict]:
  """metrics.jsonl without the timings."""
  return [{k: v for k, v in record.items() if not k.startswith("perf/") and k != "wall_time_sec"}
          for record in read_metrics(workdir)]


def _started_run(workdir, after: int = 0):
  """train.py on `workdir`, once it has written a checkpoint after step `after` (its loop runs)."""
  proc = subprocess.Popen([sys.executable, "train.py", *INTERRUPTED, f"--workdir={workdir}"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while proc.poll() is None and max(_saved_steps(workdir), default=0) <= after:
    assert time.time() < deadline
    time.sleep(0.01)
  return proc


def _saved_steps(workdir) -> list[int]:
  if not (workdir / "checkpoints").is_dir():
    return []
  return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def test_killed_and_signalled_runs_save_what_they_say_and_resume_exactly(tmp_path,
                                                                          uninterrupted):
  """SIGKILL, then SIGTERM, then SIGINT (Ctrl-C), each resumed by rerunning the command."""
  proc = _started_run(tmp_path)
  proc.kill()
  proc.communicate()
  resumed_from = _saved_steps(tmp_path)[-1]
  assert resumed_from < 600, "the run was not interrupted"
  for sig in (signal.SIGTERM, signal.SIGINT):
    proc = _started_run(tmp_path, after=resumed_from)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert f"Resumed from step {resumed_from} in" in out
    assert proc.returncode == 128 + sig, err[-3000:]  # as a shell reports the signal
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    step = int(last.split("after step ")[1].split(",")[0])
    assert last == (f"stopped by {sig.name} after step {step}, saved in "
                    f"{tmp_path / 'checkpoints'}; rerun the same command to resume")
    assert resumed_from < step < 600 and _saved_steps(tmp_path)[-1] == step
    resumed_from = step
  done = run_cli("train.py", *INTERRUPTED, f"--workdir={tmp_path}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"Resumed from step {resumed_from} in" in done.stdout
  (step_a, params_a), records = uninterrupted
  step_b, params_b = final_params(tmp_path)
  assert step_a == step_b == 600
  assert_trees_equal(params_a, params_b)
  assert _records(tmp_path) == records  # each step once, with the same values


def test_a_second_signal_stops_at_once(tmp_path):
  proc = _started_run(tmp_path)
  proc.send_signal(signal.SIGINT)
  proc.send_signal(signal.SIGTERM)  # handled right after the first: no save, no message
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == -signal.SIGTERM, err[-3000:]
  assert "stopped by" not in err


@pytest.mark.parametrize("name", ["matlm_tiny", "transnormer_llm_tiny", "transnormer_t1",
                                  "transnormer_t2_mlm"])
def test_token_ids_outside_the_vocabulary_are_refused(name):
  model = models.create_model(name, rngs=nnx.Rngs(0))
  vocab = model.embed_tokens.num_embeddings if hasattr(model, "embed_tokens") else (
      model.embed.num_embeddings)
  for token in (vocab, -1):  # a NaN row, the last row
    tokens = jnp.array([[1, 2, token]])
    with pytest.raises(ValueError) as info:
      model(tokens)
    assert str(info.value) == (f"token id {token} is outside the vocabulary: ids must be in "
                               f"[0, {vocab})")
    if hasattr(model, "decode_step"):
      with pytest.raises(ValueError, match=f"token id {token} is outside"):
        models.generate(model, tokens, 2)
  assert np.isfinite(model(jnp.array([[0, vocab - 1]]))).all()


@pytest.mark.parametrize("key, value", [("input.batch_size", 0), ("input.batch_size", -5),
                                        ("input.eval_batch_size", 0),
                                        ("optimizer.accum_steps", 0)])
def test_non_positive_batch_sizes_are_refused_in_one_line(tmp_path, key, value):
  with pytest.raises(ValueError) as info:
    train.train_and_evaluate(digits_config(**{key: value}), str(tmp_path))
  assert str(info.value) == f"{key} must be a positive integer, got {value}"


def test_the_custom_dataset_is_named_from_the_command_line(tmp_path):
  config = digits_config()
  config.lock()  # as --config.data.file=... sees it
  config.data.update(name="custom", file="my.csv", manual_dir=str(tmp_path))
  with pytest.raises(data.DataError, match="my.csv"):
    data.load(config.data, "train")


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/itransformer.py:digits", "--config.optimizer.lrr=1"],
     "error: --config.optimizer.lrr: the config has no key 'lrr'. Did you mean \"lr\" instead of "
     "\"lrr\"?"),
    (["--config", "configs/itransformer.py:digits", "--config.model.d_modle=32"],
     "error: --config.model.d_modle: the config has no key 'd_modle'. Did you mean \"d_model\" "
     "instead of \"d_modle\"?"),
    (["--config", "configs/itransformer.py:digits,runlocal", "--config.model.num_classes=5"],
     "error: model.num_classes=5, but the data digits has num_classes=10; leave model.num_classes "
     "unset"),
    (["--config", "configs/maxvit.py:nope"],
     "error: unknown MaxViT setting 'nope'; expected one of ('in1k', 'fashion_mnist', 'finetune')"),
])
def test_command_line_mistakes_end_in_one_line(tmp_path, args, message):
  out = run_cli("train.py", *args, f"--workdir={tmp_path}")
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == message
  assert "Traceback" not in out.stderr


def _parsed_config(monkeypatch, *args):
  """The config train.py's flags give for `--config *args`."""
  argv = ["train.py", "--config", *args]
  monkeypatch.setattr(sys, "argv", argv)  # where config_flags reads the overrides
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True)
  flag_values(argv)
  return flag_values.config


def test_every_model_keyword_is_set_from_the_command_line(monkeypatch):
  # A tuple, a keyword whose default is None (an int placeholder), a float, a string.
  config = _parsed_config(monkeypatch, "configs/maxvit.py:fashion_mnist", "--config.model.depths=(1,2,1)",
                          "--config.model.window_size=4", "--config.model.drop_path_rate=0")
  assert config.model.head_hidden_size is None  # not set: the variant's value
  model = _built(config)
  assert [len(stage.blocks) for stage in model.stages] == [1, 2, 1]
  assert model.window_size == 4 and config.model.drop_path_rate == 0.0

  config = _parsed_config(monkeypatch, "configs/itransformer.py:digits", "--config.model.d_model=32",
                          "--config.model.activation=relu")
  assert _built(config).embed.kernel.shape[-1] == 32 and config.model.activation == "relu"


def _built(config):
  meta = data.abstract_meta(config.data)
  with train.on_mesh(config) as mesh:
    return train.create_model_and_optimizer(config, meta, tasks.from_config(config), mesh)[0]


def test_damaged_official_checkpoints_are_refused_with_their_name(tmp_path):
  from models import convert
  noise = tmp_path / "noise.safetensors"
  noise.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(ValueError, match=f"^{noise} is not a readable .safetensors file"):
    convert.read_state_dict(noise)

  torch = pytest.importorskip("torch")
  whole, cut = tmp_path / "whole.pth", tmp_path / "cut.pth"
  torch.save({"w": torch.ones(1000)}, whole)
  cut.write_bytes(whole.read_bytes()[:2000])
  with pytest.raises(ValueError, match=f"^{cut} is a zip archive cut short"):
    convert.read_state_dict(cut)

  malformed = tmp_path / "malformed.pth"
  with zipfile.ZipFile(malformed, "w") as archive:
    archive.writestr("archive/data.pkl", b"\x80\x02}}}s.")  # a dict as a key
  with pytest.raises(ValueError, match=f"^{malformed}: its data.pkl is not a readable state_dict "
                                       r"\(TypeError: unhashable type: 'dict'\)"):
    convert.read_state_dict(malformed)


def test_a_workdir_that_cannot_be_written_is_refused_in_one_line(tmp_path, monkeypatch):
  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", path)

  monkeypatch.setattr(train, "open", read_only, raising=False)
  with pytest.raises(ValueError) as info:
    train.train_and_evaluate(digits_config(total_steps=2), str(tmp_path))
  assert str(info.value) == f"cannot write in the workdir {tmp_path}: Read-only file system"


def test_eval_output_that_cannot_be_written_is_refused_before_evaluating(tmp_path):
  (tmp_path / "a_file").write_text("")
  out = run_cli("eval.py", "--config", "configs/itransformer.py:digits", f"--workdir={tmp_path}",
                f"--output={tmp_path / 'a_file' / 'eval.json'}")
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: cannot write {tmp_path / 'a_file' / 'eval.json'}: File exists; name another file "
      "with --output")
