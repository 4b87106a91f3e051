"""Two processes x 2 CPU devices on loopback, started with train.py's / eval.py's cluster flags:
the same metrics as one process, one writer, an exact resume after SIGKILL, resume on another
process count, a mesh that splits `tensor` over processes refused, eval.py on two processes, a
dataset prepared once.

Each run serves several tests (module fixtures); the compiled steps are shared through jax's
persistent compilation cache.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

from absl import flags
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train
from configs import itransformer as itransformer_config
from configs import matformer as matformer_config
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_EVAL = 15
# Checkpoints at 15, 30, 45, all kept: later runs start from them.
DIGITS = {"total_steps": 3 * FIRST_EVAL, "eval_every_steps": FIRST_EVAL, "log_every_steps": 5,
          "checkpoint.keep": 3}
TIMEOUT = 300  # seconds, per run


# ----------------------------------------------------------------------------- helpers

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cli_args(config: str, workdir, overrides: dict) -> list[str]:
  return ["--config", config, f"--workdir={workdir}",
          *(f"--config.{key}={value!r}" if isinstance(value, tuple) else f"--config.{key}={value}"
            for key, value in overrides.items())]


def configured(config, overrides: dict):
  """`config` with the dotted-key overrides the CLI gets as --config.<key>=<value>."""
  config.unlock()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  config.lock()
  return config


class Pair:
  """Two processes of one run, process i started with --process_id=i; output in files."""

  def __init__(self, root: pathlib.Path, name: str, script: str, args: list[str]):
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2"),
           "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    self.logs = [root / f"{name}.{i}.{kind}" for i in range(2) for kind in ("out", "err")]
    self.procs = []
    for i in range(2):
      with open(self.logs[2 * i], "w") as out, open(self.logs[2 * i + 1], "w") as err:
        self.procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, script), *args,
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO, env=env, stdout=out, stderr=err))

  def __enter__(self) -> "Pair":
    return self

  def __exit__(self, *exc) -> None:
    self.kill()   # whatever failed meanwhile: no process outlives its test

  def wait(self) -> "Pair":
    deadline = time.time() + TIMEOUT
    try:
      for proc in self.procs:
        proc.wait(timeout=max(1, deadline - time.time()))
    finally:
      self.kill()
    return self

  def kill(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

  @property
  def returncodes(self) -> list[int]:
    return [proc.returncode for proc in self.procs]

  def stdout(self, i: int) -> str:
    return self.logs[2 * i].read_text()

  def stderr(self, i: int) -> str:
    return self.logs[2 * i + 1].read_text()

  def check(self) -> "Pair":
    assert self.returncodes == [0, 0], (self.stderr(0)[-3000:], self.stderr(1)[-3000:])
    return self


def run_pair(root, name, script, args) -> Pair:
  with Pair(root, name, script, args) as pair:
    return pair.wait()


def read_metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir):
  """(step, params) of the latest checkpoint of a run, as host arrays (whatever its processes)."""
  checkpoints = pathlib.Path(workdir).absolute() / "checkpoints"
  step = max(ocp.utils.checkpoint_steps(checkpoints))
  checkpointer = ocp.StandardCheckpointer()
  item = checkpoints / str(step) / "params"
  metadata = checkpointer.metadata(item).item_metadata.tree
  return step, checkpointer.restore(item, jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata))


def assert_trees_equal(a, b) -> None:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def final_metrics(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "final_metrics.json").read_text())


def assert_same_metrics(got: dict, want: dict, rtol: float) -> None:
  # Not perplexity = exp(loss): its relative error is the loss's absolute one (3.4x here).
  keys = [k for k in want if "/" in k and not k.endswith("/perplexity")]
  assert keys and {k: got[k] for k in keys} == pytest.approx({k: want[k] for k in keys}, rel=rtol)
  assert (got["best_step"], got["steps"]) == (want["best_step"], want["steps"])


def keep_steps_up_to(workdir, step: int, copy: pathlib.Path) -> pathlib.Path:
  """A copy of a finished run as it was when it stopped after `step`: later checkpoints and
  records gone, no final metrics (TensorBoard events left out)."""
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("tensorboard", "final_metrics.json"))
  for saved in (copy / "checkpoints").iterdir():
    if saved.name.isdigit() and int(saved.name) > step:
      shutil.rmtree(saved)
  kept = [line for line in (copy / "metrics.jsonl").read_text().splitlines()
          if json.loads(line)["step"] <= step]
  (copy / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
  return copy


# ----------------------------------------------------------------------------- digits runs

@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def digits(root):
  """The quick start, shortened. The two-process runs start from the one-process run's
  checkpoint of step 15 (a one-process workdir resumed on two processes) and train 30 steps."""
  return {**DIGITS, "data.data_dir": str(root / "tfds")}


def digits_config(overrides: dict):
  return configured(itransformer_config.get_config("digits"), overrides)


@pytest.fixture(scope="module")
def one_process_run(root, digits):
  workdir = root / "one"
  train.train_and_evaluate(digits_config(digits), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def two_process_run(root, digits, one_process_run):
  workdir = keep_steps_up_to(one_process_run, FIRST_EVAL, root / "two")
  pair = run_pair(root, "two", "train.py", cli_args("configs/itransformer.py:digits", workdir, digits))
  return workdir, pair.check()


def test_one_process_run_continues_on_two_as_on_one(two_process_run, one_process_run):
  workdir, pair = two_process_run
  assert f"Resumed from step {FIRST_EVAL}" in pair.stdout(0)
  assert_same_metrics(final_metrics(workdir), final_metrics(one_process_run), rtol=1e-6)
  # One copy of every record (those of the first 15 steps come from the one-process run), the
  # records one process writes, and the same losses.
  records, reference = read_metrics(workdir), read_metrics(one_process_run)
  assert [(r["step"], sorted(r)) for r in records] == [(r["step"], sorted(r)) for r in reference]
  losses = [[r["train/loss"] for r in rs if "train/loss" in r] for rs in (records, reference)]
  assert len(losses[0]) == DIGITS["total_steps"] // DIGITS["log_every_steps"]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
  assert len(os.listdir(workdir / "tensorboard")) == 1
  # Process 0 prints the evaluations and the table; process 1 computes the same, silently.
  assert "Final metrics" in pair.stdout(0) and "step 30 (epoch" in pair.stdout(0)
  assert "Final metrics" not in pair.stdout(1) and "step 30 (epoch" not in pair.stdout(1)


def test_sigkill_resumes_exactly_and_on_one_process(root, digits, two_process_run, one_process_run):
  """Killed after its checkpoint of step 30, rerun: the uninterrupted two-process run's params,
  bit for bit. The interrupted run finished by one process gives the one-process metrics."""
  killed = keep_steps_up_to(one_process_run, FIRST_EVAL, root / "killed")
  args = cli_args("configs/itransformer.py:digits", killed, digits)
  deadline = time.time() + TIMEOUT
  with Pair(root, "killed", "train.py", args) as pair:
    while (not (killed / "checkpoints" / str(2 * FIRST_EVAL)).exists() and time.time() < deadline
           and None in (p.poll() for p in pair.procs)):
      time.sleep(0.02)
  saved = sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
  assert saved[-1] == 2 * FIRST_EVAL, f"the run was not interrupted there (checkpoints {saved})"
  interrupted = root / "killed_copy"
  shutil.copytree(killed, interrupted)

  with Pair(root, "resumed", "train.py", args) as resumed:
    final = train.train_and_evaluate(digits_config(digits), str(interrupted))  # meanwhile
    resumed.wait().check()
  assert f"Resumed from step {saved[-1]}" in resumed.stdout(0)
  step_a, params_a = final_params(two_process_run[0])
  step_b, params_b = final_params(killed)
  assert step_a == step_b == DIGITS["total_steps"]
  assert_trees_equal(params_a, params_b)
  assert_same_metrics(final, final_metrics(one_process_run), rtol=1e-6)


def test_tensor_axis_across_processes_is_refused(root):
  args = cli_args("configs/itransformer.py:digits", root / "tensor4",
                  {"mesh.data": 1, "mesh.tensor": 4, "total_steps": 2})
  pair = run_pair(root, "tensor4", "train.py", args)
  assert pair.returncodes[0] != 0 and pair.returncodes[1] != 0
  for i in range(2):
    errors = [line for line in pair.stderr(i).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tensor (4) must divide a process's 2 devices" in errors[0], pair.stderr(i)[-2000:]
    assert "Traceback" not in pair.stderr(i)
  assert not (root / "tensor4" / "metrics.jsonl").exists()


def test_cluster_flags_reach_initialize_and_its_errors_are_one_line(monkeypatch):
  calls = []

  def initialize(**kwargs):
    calls.append(kwargs)
    if kwargs.get("num_processes") == 3:
      raise RuntimeError("Barrier timed out.\n  Id: PjRT_Client_Connect\n  some detail")

  monkeypatch.setattr(jax.distributed, "initialize", initialize)

  def joined(*argv):
    flag_values = flags.FlagValues()
    train.define_multihost_flags(flag_values)
    flag_values(["train.py", *argv])
    train.initialize_multihost(flag_values)
    return calls.pop() if calls else None

  assert joined() is None                    # one process: nothing to join
  assert joined("--multihost") == {}         # the cluster detected by jax
  assert joined("--coordinator_address=10.0.0.1:1234", "--num_processes=2", "--process_id=1",
                "--local_device_ids=0,1") == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                             "process_id": 1, "local_device_ids": [0, 1]}
  with pytest.raises(ValueError, match=r"^could not join the multi-process run \(num_processes=3, "
                                       r"process_id=0\): Barrier timed out\.$"):
    joined("--num_processes=3", "--process_id=0")
  with pytest.raises(ValueError, match=r"^--process_id=2 must be below --num_processes=2$"):
    joined("--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2")
  with pytest.raises(ValueError, match=r"^--local_device_ids=a: expected device numbers"):
    joined("--local_device_ids=a")


def test_interleaved_processes_are_refused(monkeypatch):
  """A device order that gives each process every other data position (as a topology-aware mesh
  could) is refused: a process must feed one contiguous block of each batch."""
  class Device:
    def __init__(self, process_index):
      self.process_index = process_index

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "local_device_count", lambda: 2)
  interleaved = types.SimpleNamespace(
      shape={"data": 4, "fsdp": 1, "tensor": 1},
      devices=np.array([Device(p) for p in (0, 1, 0, 1)], dtype=object).reshape(4, 1, 1))
  with pytest.raises(ValueError, match=r"gives process 0 the data x fsdp positions \[0, 2\], not one contiguous"):
    train.check_mesh_over_processes(interleaved)
  blocks = types.SimpleNamespace(shape=interleaved.shape, devices=interleaved.devices[[0, 2, 1, 3]])
  train.check_mesh_over_processes(blocks)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert train.process_batch_slice(blocks) == (1, 2)


def test_eval_on_two_processes_writes_one_result(root, digits, two_process_run):
  """eval.py on two processes with the params split over fsdp across them: each process restores
  only its halves (models.load_pretrained); one JSON, the metrics of one process."""
  import eval as eval_lib

  workdir = two_process_run[0]
  args = ["--config", "configs/itransformer.py:digits", f"--workdir={workdir}", f"--checkpoint={workdir}",
          "--split=test", f"--output={root / 'eval.json'}", f"--config.data.data_dir={digits['data.data_dir']}",
          "--config.mesh.data=1", "--config.mesh.fsdp=4"]
  with Pair(root, "eval", "eval.py", args) as pair:
    one = eval_lib.evaluate_checkpoint(digits_config(digits), str(workdir), str(workdir), "test")  # meanwhile
    pair.wait().check()
  assert "wrote" in pair.stdout(0) and "wrote" not in pair.stdout(1)
  assert "test/accuracy" in pair.stdout(0) and "test/accuracy" not in pair.stdout(1)
  written = json.loads((root / "eval.json").read_text())
  assert {k: written[k] for k in ("accuracy", "loss")} == pytest.approx(
      {k: one[k] for k in ("accuracy", "loss")}, rel=1e-6)
  assert written["loss"] == pytest.approx(final_metrics(workdir)["test/loss"], rel=1e-6)


# ----------------------------------------------------------------------------- a language model

def test_language_model_on_two_processes_matches_one(root):
  if not os.environ.get("ZOO_TEST_DATA"):
    pytest.skip("ZOO_TEST_DATA (the shared/data folder of real benchmark files) is not set")
  raw = pathlib.Path(os.environ["ZOO_TEST_DATA"]).absolute() / "tiny_shakespeare"
  # Short sequences and one evaluation: the runlocal recipe at a fraction of its compute. Each
  # run prepares the dataset on first use, the two processes by process 0 alone.
  overrides = {"data.manual_dir": str(raw), "data.seq_len": 64, "input.batch_size": 8,
               "eval_every_steps": 20, "final_eval_splits": ("validation",)}
  name = "configs/matformer.py:lm_tiny_shakespeare,runlocal"
  config = configured(matformer_config.get_config("lm_tiny_shakespeare,runlocal"),
                      {**overrides, "data.data_dir": str(root / "lm_tfds_one")})
  with Pair(root, "lm", "train.py",
            cli_args(name, root / "lm_two", {**overrides, "data.data_dir": str(root / "lm_tfds_two")})) as pair:
    one = train.train_and_evaluate(config, str(root / "lm_one"))  # meanwhile
    pair.wait().check()
  assert_same_metrics(final_metrics(root / "lm_two"), one, rtol=1e-6)
