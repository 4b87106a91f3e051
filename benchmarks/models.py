"""Model throughput: forward and training-step examples/s, one table line per model.

    python benchmarks/models.py                             # every model in MODELS
    python benchmarks/models.py --models hornet_tiny_7x7 --json benchmarks/results/models.json
    python benchmarks/models.py --models maxvit_tiny_tf_224 --rounds 3 \
        --torch_python /path/to/venv/bin/python            # beside timm's PyTorch model

The device is JAX's default one. On CPU: float32 compute and each model's CPU batch; on a GPU or
TPU: bfloat16 compute (float32 params and optimizer state) and the accelerator batch.
Forward: `model(x, train=False)`, jitted. Training step: train.py's own jitted step (the task's
loss, backward, AdamW update with clipping, the state donated), so drop path and the like run as
in training. Timing: benchmarks/ops.py's `time_fn` (compile left out, warm-up, median of
`--reps` repetitions with p10/p90), `--rounds` times per model; a row holds the median over the
rounds. `cores busy` is the process's CPU time over the wall time of the timed calls (warm-up
included, compile not): about how many cores the implementation kept busy.

`--torch_python PATH` (a Python with torch and timm; the zoo never imports either) puts timm's
PyTorch model beside each model that timm also has (`Entry.timm`), float32, random weights, the
zoo's batch and drop-path rate, `--torch_threads` intra-op threads, run by
benchmarks/timm_reference.py. Zoo and timm alternate round by round (zoo, timm, zoo, timm, ...)
so that a changing load falls on both alike; `zoo/timm` is the ratio of examples/s (> 1: the
zoo is faster), the median over the rounds' ratios. XLA:CPU runs on as many threads as the
process may use cores (`os.sched_getaffinity`, printed as `cpu_affinity`).

`--keep_freed_memory` says whose malloc keeps freed memory mapped. `zoo` (the default) runs the
zoo as train.py does (`ops.xla_cpu.keep_freed_memory_mapped`) and timm as it comes; `both` gives timm's
process the same glibc settings (GLIBC_TUNABLES), an equal footing; `none` leaves both alone.

Another model gets one line in MODELS: its registered name, the task train.py trains it with, a
batch maker, its batch sizes, timm's name of it and (other than image classifiers) its inference
call.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import models  # noqa: E402
import ops  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
from configs import common  # noqa: E402


def _load_ops_benchmark():
  """benchmarks/ops.py as a module (its name would clash with the `ops` package)."""
  spec = importlib.util.spec_from_file_location("ops_benchmark", REPO / "benchmarks" / "ops.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_OPS_BENCHMARK = _load_ops_benchmark()
time_fn, environment = _OPS_BENCHMARK.time_fn, _OPS_BENCHMARK.environment


def images(size: int, channels: int = 3, num_classes: int = 1000) -> Callable[[int], dict]:
  """A classification batch maker: random NHWC images and labels."""
  def make(batch: int) -> dict:
    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((batch, size, size, channels), np.float32),
            "label": rng.integers(0, num_classes, batch).astype(np.int32)}
  return make


def tokens(length: int, vocab_size: int) -> Callable[[int], dict]:
  """A language-modelling batch maker: random token ids, every target weighted."""
  def make(batch: int) -> dict:
    rng = np.random.default_rng(0)
    return {"tokens": rng.integers(0, vocab_size, (batch, length + 1)).astype(np.int32),
            "weights": np.ones((batch, length), np.float32)}
  return make


def series(lookback: int, horizon: int, variates: int) -> Callable[[int], dict]:
  """A forecasting batch maker: random lookback windows and targets."""
  def make(batch: int) -> dict:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((batch, lookback, variates), np.float32),
            "y": rng.standard_normal((batch, horizon, variates), np.float32)}
  return make


def classify(model: nnx.Module, batch: dict) -> jax.Array:
  return model(batch["image"], train=False)


def next_token_logits(model: nnx.Module, batch: dict) -> jax.Array:
  return model(batch["tokens"][:, :-1], train=False)


def forecast(model: nnx.Module, batch: dict) -> jax.Array:
  return model(batch["x"], None, train=False)


@dataclasses.dataclass(frozen=True)
class Entry:
  model: str                          # a models.list_models() name
  task: str                           # the tasks.get_task() name train.py trains it with
  make_batch: Callable[[int], dict]   # batch size -> the batch the task reads
  batch_cpu: int
  batch_accelerator: int
  timm: str | None = None             # timm's name of the same model (None: timm has none)
  forward: Callable[[nnx.Module, dict], jax.Array] = classify  # the inference call
  accelerator_only: bool = False      # left out of the default list on CPU (too big for it)


MODELS = (
    # HorNet and BiFormer are not in timm (1.0.29): no PyTorch twin to run beside them.
    Entry("hornet_tiny_7x7", "classification", images(224), batch_cpu=8, batch_accelerator=128),
    Entry("hornet_tiny_gf", "classification", images(224), batch_cpu=8, batch_accelerator=128),
    Entry("biformer_tiny", "classification", images(224), batch_cpu=8, batch_accelerator=128),
    Entry("maxvit_tiny_tf_224", "classification", images(224), batch_cpu=8,
          batch_accelerator=128, timm="maxvit_tiny_tf_224"),
    Entry("itransformer_etth1_96", "forecasting", series(96, 96, 7), batch_cpu=32,
          batch_accelerator=32, forward=forecast),
    # The LM recipes' shapes: 2048-token sequences, 4 a step per accelerator here.
    Entry("transnormer_llm_385m", "language_modeling", tokens(2048, 64000), batch_cpu=1,
          batch_accelerator=4, forward=next_token_logits, accelerator_only=True),
    Entry("matlm_olmo_180m", "language_modeling", tokens(2048, 50304), batch_cpu=1,
          batch_accelerator=4, forward=next_token_logits, accelerator_only=True),
)


def _optimizer() -> optax.GradientTransformation:
  config = common.base_config()
  config.optimizer.name = "adamw"
  config.optimizer.weight_decay = 0.05
  config.optimizer.clip_norm = 1.0
  return train.make_optimizer(config, optax.constant_schedule(1e-4))


def _timed(fn, *args, reps: int) -> dict:
  """time_fn's median, p10, p90 (ms) and the cores busy over its calls."""
  wall0, cpu0 = time.perf_counter(), time.process_time()
  median, p10, p90 = time_fn(fn, *args, min_reps=reps)
  cpu_per_wall = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
  return dict(ms=median * 1e3, p10_p90_ms=[p10 * 1e3, p90 * 1e3], cpu_per_wall=cpu_per_wall)


class ZooBench:
  """A zoo model's jitted forward and train.py step on one batch, compiled, ready to time."""

  def __init__(self, entry: Entry):
    accelerator = jax.default_backend() != "cpu"
    self.entry = entry
    self.dtype = jnp.bfloat16 if accelerator else jnp.float32
    self.batch_size = entry.batch_accelerator if accelerator else entry.batch_cpu
    self.batch = {k: jnp.asarray(v) for k, v in entry.make_batch(self.batch_size).items()}
    model = models.create_model(entry.model, dtype=self.dtype, rngs=nnx.Rngs(0))
    self.params = models.count_params(model)

    graphdef, model_state = nnx.split(model)
    # A copy: the train step donates the arrays it shares with the model.
    self.model_state = jax.tree.map(jnp.copy, model_state)
    self.forward = jax.jit(
        lambda state, batch: entry.forward(nnx.merge(graphdef, state), batch))

    state_graphdef, self.state = nnx.split(
        (model, nnx.Optimizer(model, _optimizer(), wrt=nnx.Param)))
    self.step_fn = train.make_train_step(tasks.get_task(entry.task), state_graphdef,
                                         train.rng_streams(model), seed=0)
    self.step = 0
    # Compile both now, so that no round's cores-busy figure counts XLA's compiler.
    jax.block_until_ready(self.forward(self.model_state, self.batch))
    jax.block_until_ready(self.train_step())

  def train_step(self) -> jax.Array:
    """Advances the donated state, as the training loop does."""
    self.state, metrics = self.step_fn(self.state, self.batch, self.step)
    self.step += 1
    return metrics["loss"]

  def measure(self, reps: int) -> dict:
    forward = _timed(self.forward, self.model_state, self.batch, reps=reps)
    train_step = _timed(self.train_step, reps=reps)
    return dict(model=self.entry.model, implementation="zoo (jax)", params=self.params,
                dtype=jnp.dtype(self.dtype).name, batch=self.batch_size,
                forward_per_s=self.batch_size / forward["ms"] * 1e3, forward_ms=forward["ms"],
                forward_p10_p90_ms=forward["p10_p90_ms"],
                forward_cpu_per_wall=forward["cpu_per_wall"],
                train_per_s=self.batch_size / train_step["ms"] * 1e3,
                train_step_ms=train_step["ms"], train_p10_p90_ms=train_step["p10_p90_ms"],
                train_cpu_per_wall=train_step["cpu_per_wall"])


class TimmBench:
  """benchmarks/timm_reference.py --serve in another Python: one measurement per call."""

  def __init__(self, torch_python: str, entry: Entry, batch_size: int, threads: int, reps: int,
               env: dict[str, str]):
    drop_path_rate = models.model_info(entry.model).defaults.get("drop_path_rate", 0.0)
    command = [torch_python, str(REPO / "benchmarks" / "timm_reference.py"), "--serve",
               "--model", entry.timm, "--batch", str(batch_size), "--threads", str(threads),
               "--reps", str(reps), "--drop_path_rate", str(drop_path_rate)]
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, env=env)

  def measure(self) -> dict:
    self.process.stdin.write("measure\n")
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"timm_reference.py exited with {self.process.wait()} (its stderr "
                         "is above)")
    return dict(json.loads(line), implementation="timm (torch)", dtype="float32")

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait()


_PER_ROUND = ("forward_per_s", "forward_ms", "forward_cpu_per_wall", "train_per_s",
              "train_step_ms", "train_cpu_per_wall")


def summarize(rounds: list[dict]) -> dict:
  """One row from the rounds of one implementation: medians, and every round's numbers."""
  row = dict(rounds[0])
  for key in _PER_ROUND:
    row[key] = statistics.median(r[key] for r in rounds)
  row["rounds"] = [{key: r[key] for key in _PER_ROUND + ("forward_p10_p90_ms",
                                                         "train_p10_p90_ms")} for r in rounds]
  del row["forward_p10_p90_ms"], row["train_p10_p90_ms"]  # per round, in row["rounds"]
  return row


def add_ratios(zoo: dict, reference: dict) -> None:
  """zoo/timm examples/s per pass: the median over the rounds' ratios (rounds alternate)."""
  for key, name in (("forward_per_s", "forward_zoo_over_timm"),
                    ("train_per_s", "train_zoo_over_timm")):
    ratios = [z[key] / t[key] for z, t in zip(zoo["rounds"], reference["rounds"])]
    zoo[name] = statistics.median(ratios)
    zoo[name + "_rounds"] = ratios


def print_header() -> None:
  print("| model | implementation | params | dtype | batch | forward ex/s | forward ms "
        "| train ex/s | train step ms | cores busy fwd / train | zoo/timm fwd | zoo/timm train |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)


def print_row(r: dict, no_timm: str = "") -> None:
  ratios = ([f"{r['forward_zoo_over_timm']:.2f}", f"{r['train_zoo_over_timm']:.2f}"]
            if "train_zoo_over_timm" in r else [no_timm, no_timm])
  print(f"| {r['model']} | {r['implementation']} | {r['params']:,} | {r['dtype']} | {r['batch']} "
        f"| {r['forward_per_s']:.2f} | {r['forward_ms']:.0f} | {r['train_per_s']:.2f} "
        f"| {r['train_step_ms']:.0f} | {r['forward_cpu_per_wall']:.2f} / "
        f"{r['train_cpu_per_wall']:.2f} | {ratios[0]} | {ratios[1]} |", flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="*",
                      help="names from MODELS (default: all; on CPU those not accelerator_only)")
  parser.add_argument("--json", type=Path, help="write the rows and the environment here")
  parser.add_argument("--rounds", type=int, default=1, help="measurements per model")
  parser.add_argument("--reps", type=int, default=10, help="timed samples per measurement")
  parser.add_argument("--torch_python", help="a Python with torch and timm: timm's twin beside")
  parser.add_argument("--torch_threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="torch intra-op threads (default: the cores this process may use)")
  parser.add_argument("--keep_freed_memory", choices=("zoo", "both", "none"), default="zoo",
                      help="whose malloc keeps freed memory mapped (module docstring)")
  args = parser.parse_args(argv)
  known = {entry.model: entry for entry in MODELS}
  unknown = sorted(set(args.models or ()) - set(known))
  if unknown:
    parser.error(f"unknown models {unknown}; MODELS has {sorted(known)}")
  if args.keep_freed_memory != "none":
    ops.xla_cpu.keep_freed_memory_mapped()
  timm_env = dict(os.environ)
  if args.keep_freed_memory == "both":
    timm_env["GLIBC_TUNABLES"] = ops.xla_cpu.kept_memory_tunables()
  env = dict(environment(), cpu_affinity=len(os.sched_getaffinity(0)),
             xla_flags=os.environ.get("XLA_FLAGS", ""), rounds=args.rounds, reps=args.reps,
             keep_freed_memory=args.keep_freed_memory)
  if args.torch_python:
    env["torch_threads"] = args.torch_threads
  print(json.dumps(env))
  print_header()
  rows = []
  on_cpu = jax.default_backend() == "cpu"
  default = [e.model for e in MODELS if not (on_cpu and e.accelerator_only)]
  for name in args.models or default:  # each model's rows as soon as they are measured
    entry = known[name]
    zoo = ZooBench(entry)
    reference = None
    if args.torch_python and entry.timm:
      reference = TimmBench(args.torch_python, entry, zoo.batch_size, args.torch_threads,
                            args.reps, timm_env)
    zoo_rounds, timm_rounds = [], []
    try:
      for _ in range(args.rounds):
        zoo_rounds.append(zoo.measure(args.reps))
        if reference:
          timm_rounds.append(reference.measure())
    finally:
      if reference:
        reference.close()
    rows.append(summarize(zoo_rounds))
    if reference:
      rows.append(summarize(timm_rounds))
      add_ratios(rows[-2], rows[-1])
      print_row(rows[-2])
      print_row(rows[-1])
    else:
      print_row(rows[-1], "no timm model" if args.torch_python else "")
    del zoo  # its compiled steps and state
    if args.json:  # after every model: a run stopped by a time limit keeps what it measured
      args.json.parent.mkdir(parents=True, exist_ok=True)
      args.json.write_text(json.dumps(dict(environment=env, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
  main()
