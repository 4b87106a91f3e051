"""Lightning attention vs causal softmax attention: cost per token against length, and decoding.

    python benchmarks/linear_attention.py --suite scaling    # ops: forward and forward+backward
    python benchmarks/linear_attention.py --suite decode     # models.generate: TNL vs KV cache
    python benchmarks/linear_attention.py --suite train_step # train.py's step, TNL vs softmax LM

`scaling`: `ops.lightning_attention` (per-head decay as in TransNormerLLM) and causal
`ops.attention` at L = 64 ... 32k tokens, B = 1, H = 2, D = E = 64, f32, each op's default
implementation on this platform (on CPU both are the XLA paths: the chunked sweep and the
reference softmax). Time per token should stay flat for the linear op: the script reports
time(32k) / time(1k) of its forward+backward (linear: 32; the goal is <= 40) and the length from
which it beats softmax attention (the crossover). Softmax attention keeps [H, L, L] scores, so a
length whose compiled scratch memory exceeds --max_gib is not run (its size is reported). The
cases take turns over --rounds rounds, so that a shared machine's load falls on all lengths alike.

`decode`: `models.generate` (greedy, batch 1, one-token prompt) of the two tiny LMs of the tiny
Shakespeare comparison: `transnormer_llm_tiny` (recurrent state) and `transformer_lm_tiny` (KV
cache), at several generated lengths: tokens/s, the cache's bytes and the compiled loop's scratch
memory. Random weights: the speed and memory do not depend on what was learned.

`train_step`: train.py's step of the same two models on a tiny Shakespeare batch (16 x 256), the
two taking turns (a shared machine's load then slows both alike): tokens/s.

Timing is benchmarks/ops.py's `time_fn` (jit, compile left out, >= 3 warm-up calls, then
repetitions of >= 25 ms each: 10, or 3 per round where the cases take turns; medians).
`--json PATH` writes the rows with the environment.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
import ops  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
from benchmarks.ops import environment, temp_bytes, time_fn  # noqa: E402
from configs import transnormer as transnormer_config  # noqa: E402
from models.transnormer_llm import alibi_slopes  # noqa: E402

LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
HEADS, HEAD_DIM = 2, 64
DECODE_LENGTHS = (128, 512, 2048, 8192)
DECODE_MODELS = ("transnormer_llm_tiny", "transformer_lm_tiny")


def _fwd_and_fwd_bwd(f, args):
  """Jitted forward and forward+backward (a fixed random cotangent) of f(*args)."""
  out = jax.eval_shape(f, *args)
  do = jax.random.normal(jax.random.key(9), out.shape, out.dtype)
  return {"fwd": jax.jit(f), "fwd+bwd": jax.jit(lambda *a: jax.vjp(f, *a)[1](do))}


def suite_scaling(args):
  """Every (op, length, pass) once per round, rounds one after another, so that a shared
  machine's load changes fall on short and long sequences alike; a case is the median over
  rounds of each round's median. Cases slower than --repeat_below_s per call run in round 1
  only (they are the softmax ones far past the crossover)."""
  decay = jnp.asarray(alibi_slopes(HEADS), jnp.float32)   # TransNormerLLM's first-layer rates
  ops_by_name = {
      "lightning": lambda q, k, v: ops.lightning_attention(q, k, v, decay=decay),
      "softmax": lambda q, k, v: ops.attention(q, k, v, causal=True),
  }
  cases = {}
  for length in args.lengths:
    keys = jax.random.split(jax.random.key(length), 3)
    # Lightning attention takes feature-mapped q, k (TransNormerLLM: silu); softmax takes raw ones.
    q, k, v = (jax.random.normal(key, (1, length, HEADS, HEAD_DIM), jnp.float32) for key in keys)
    for name, f in ops_by_name.items():
      inputs = (jax.nn.silu(q), jax.nn.silu(k), v) if name == "lightning" else (q, k, v)
      for pass_name, fn in _fwd_and_fwd_bwd(f, inputs).items():
        memory = temp_bytes(fn, *inputs)
        row = dict(op=name, length=length, passes=pass_name,
                   temp_mib=None if memory is None else memory / 2 ** 20)
        if memory is not None and memory > args.max_gib * 2 ** 30:
          row["skipped"] = f"needs {memory / 2 ** 30:.1f} GiB scratch > --max_gib"
        cases[name, length, pass_name] = (row, fn, inputs, [])
  for round_index in range(args.rounds):
    for row, fn, inputs, seconds in cases.values():
      if "skipped" in row or (round_index and seconds[0] > args.repeat_below_s):
        continue
      seconds.append(time_fn(fn, *inputs, min_reps=3 if args.rounds > 1 else 10)[0])
    print(f"round {round_index + 1} of {args.rounds} done", flush=True)
  rows = []
  for row, _, _, seconds in cases.values():
    if seconds:
      med = statistics.median(seconds)
      row |= dict(median_ms=med * 1e3, min_ms=min(seconds) * 1e3,
                  rounds_ms=[t * 1e3 for t in seconds], us_per_token=med * 1e6 / row["length"])
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def scaling_summary(rows) -> dict:
  """time(32k) / time(1k) of each op's passes, and the crossover of forward+backward."""
  ms = {(r["op"], r["passes"], r["length"]): r["median_ms"] for r in rows if "median_ms" in r}
  fastest = {(r["op"], r["passes"], r["length"]): r["min_ms"] for r in rows if "min_ms" in r}
  summary = {}
  for op in ("lightning", "softmax"):
    for pass_name in ("fwd", "fwd+bwd"):
      for stat, times in (("median", ms), ("min", fastest)):
        if (op, pass_name, 32768) in times and (op, pass_name, 1024) in times:
          summary[f"{op} {pass_name} t(32k)/t(1k), {stat} over rounds"] = (
              times[op, pass_name, 32768] / times[op, pass_name, 1024])
  for pass_name in ("fwd", "fwd+bwd"):
    both = sorted({n for (op, p, n) in ms if p == pass_name and op == "softmax"
                   and ("lightning", p, n) in ms})
    faster_from = None            # the shortest length from which lightning wins at every length
    for n in reversed(both):
      if ms["lightning", pass_name, n] >= ms["softmax", pass_name, n]:
        break
      faster_from = n
    if faster_from is None:
      summary[f"crossover {pass_name}"] = f"softmax faster at every length measured ({both})"
    elif faster_from == both[0]:
      summary[f"crossover {pass_name}"] = f"lightning faster at every length measured ({both})"
    else:
      before = both[both.index(faster_from) - 1]
      summary[f"crossover {pass_name}"] = f"between L = {before} and L = {faster_from}"
  return summary


def _cache_bytes(model, batch: int, max_len: int) -> int:
  cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def suite_decode(args):
  rows = []
  prompt = jnp.zeros((1, 1), jnp.int32)
  for name in DECODE_MODELS:
    model = models.create_model(name, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    for new_tokens in args.new_tokens:
      fn = jax.jit(lambda state, prompt, n=new_tokens: models.generate(
          nnx.merge(graphdef, state), prompt, n))
      jax.block_until_ready(fn(state, prompt))                       # compile
      start = time.perf_counter()
      jax.block_until_ready(fn(state, prompt))
      once = time.perf_counter() - start
      # A call slower than --max_call_s is timed once (the KV-cache model at long lengths).
      med, p10, p90 = (once,) * 3 if once > args.max_call_s else time_fn(fn, state, prompt)
      memory = temp_bytes(fn, state, prompt)
      row = dict(model=name, new_tokens=new_tokens, median_s=med, p10_s=p10, p90_s=p90,
                 calls_timed="1" if once > args.max_call_s else ">= 10",
                 tokens_per_s=new_tokens / med,
                 cache_kib=_cache_bytes(model, 1, 1 + new_tokens) / 2 ** 10,
                 temp_kib=None if memory is None else memory / 2 ** 10)
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def suite_train_step(args):
  """train.py's jitted step (AdamW, clipping, donation) of each tiny LM on the tiny Shakespeare
  batch (16 x 256 bytes), the models taking turns so that a shared machine's load falls on both
  alike: the median over rounds of each round's median step time."""
  config = transnormer_config.get_config("tiny_shakespeare")
  batch_size, seq_len = config.input.batch_size, config.data.seq_len
  tokens = jax.random.randint(jax.random.key(0), (batch_size, seq_len + 1), 0, 256, jnp.int32)
  batch = {"tokens": tokens, "weights": jnp.ones((batch_size, seq_len), jnp.float32),
           "num_bytes": jnp.full((batch_size,), float(seq_len), jnp.float32)}
  task = tasks.get_task(config.task)
  steppers = {}
  for name in DECODE_MODELS:
    model = models.create_model(name, rngs=nnx.Rngs(config.seed))
    tx = train.make_optimizer(config, train.make_schedule(config, 1.0, config.total_steps))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    steppers[name] = _Stepper(train.make_train_step(task, graphdef, train.rng_streams(model),
                                                    config.seed), state, batch)
  per_round = {name: [] for name in steppers}
  for _ in range(args.rounds):
    for name, stepper in steppers.items():
      per_round[name].append(time_fn(stepper, min_reps=3)[0])
  rows = []
  for name, seconds in per_round.items():
    med = statistics.median(seconds)
    rows.append(dict(model=name, batch=f"{batch_size} x {seq_len}", median_step_s=med,
                     rounds_s=seconds, tokens_per_s=batch_size * seq_len / med))
    print(json.dumps(rows[-1]), flush=True)
  return rows


class _Stepper:
  """Calls a donating train step on its own state, so that the timer can call it repeatedly."""

  def __init__(self, step, state, batch):
    self.step, self.state, self.batch, self.count = step, state, batch, 0

  def __call__(self):
    self.state, metrics = self.step(self.state, self.batch, self.count)
    self.count += 1
    return metrics["loss"]


SUITES = {"scaling": suite_scaling, "decode": suite_decode, "train_step": suite_train_step}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--suite", choices=sorted(SUITES), required=True)
  parser.add_argument("--max_gib", type=float, default=4.0,
                      help="scaling: skip a case whose compiled scratch memory is larger (GiB)")
  parser.add_argument("--repeat_below_s", type=float, default=1.0,
                      help="scaling: cases slower than this (s per call) run in round 1 only")
  parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="scaling: L")
  parser.add_argument("--new_tokens", type=int, nargs="+", default=DECODE_LENGTHS,
                      help="decode: generated lengths")
  parser.add_argument("--max_call_s", type=float, default=10.0,
                      help="decode: a case slower than this per call is timed once")
  parser.add_argument("--rounds", type=int, default=5,
                      help="scaling, train_step: rounds of turns (see the suites)")
  parser.add_argument("--json", type=Path, help="write the rows and the environment here")
  args = parser.parse_args(argv)
  env = environment()
  print(json.dumps(env), flush=True)
  rows = SUITES[args.suite](args)
  out = dict(environment=env, suite=args.suite, rows=rows)
  if args.suite == "scaling":
    out["summary"] = scaling_summary(rows)
    print(json.dumps(out["summary"], indent=1))
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
