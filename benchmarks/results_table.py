"""Renders the tables of benchmarks/RESULTS.md from benchmarks/results/.

    python benchmarks/results_table.py           # rewrite RESULTS.md's generated blocks
    python benchmarks/results_table.py --check   # exit 1 with a diff when RESULTS.md is stale

A generated block is the text between `<!-- table: NAME -->` and `<!-- /table -->`. NAME is a key
of TABLES; its function reads the files of results/ it names and returns the block: the run's date,
device, versions and command, then its table. Everything outside the blocks is written by hand.
A benchmark script that reruns writes its JSON (or .md report); rerun this script after it. The
JSON files of runs that no script records (a train.py run, a compile) say so in their "source".
tests/test_benchmarks.py fails when RESULTS.md and results/ disagree, and when a file of results/
feeds no table and is not linked from RESULTS.md.

Standard library only.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_DIR = HERE / "results"
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)

VERSION_NAMES = {"jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax",
                 "orbax_checkpoint": "orbax-checkpoint", "grain": "grain", "libtpu": "libtpu",
                 "huggingface_hub": "huggingface_hub", "safetensors": "safetensors",
                 "torch": "torch", "timm": "timm", "python": "Python"}


# ---- helpers --------------------------------------------------------------------------------------


def load(name: str, results_dir: Path) -> dict:
  with open(results_dir / name) as f:
    return json.load(f)


def table(headers: list[str], rows: list[list]) -> list[str]:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def g3(x) -> str:
  """Three significant digits, as benchmarks/ops.py prints its rows."""
  return f"{x:.3g}"


def commas(x: float) -> str:
  return f"{x:,.0f}"


def header(env: dict, versions: str | None = None) -> list[str]:
  """The run's facts as a list: date, device, conditions, versions, command(s)."""
  if versions is None:
    versions = ", ".join(f"{label} {env[key]}" for key, label in VERSION_NAMES.items()
                         if env.get(key))
  lines = [f"- Date: {env['date']}", f"- Device: {env['device']}"]
  if env.get("conditions"):
    lines.append(f"- Conditions: {env['conditions']}")
  lines.append(f"- Versions: {versions}")
  if "command" not in env:
    return lines + [f"- Method: {env['method']}", ""]
  commands = env["command"] if isinstance(env["command"], list) else [env["command"]]
  return lines + ["- Command:", "", "```bash", *map(wrap, commands), "```", ""]


def wrap(command: str, width: int = 100) -> str:
  """A shell command on lines of at most `width` columns, continued with backslashes."""
  if "#" in command or len(command) <= width:
    return command
  lines = textwrap.wrap(command, width - 2, break_long_words=False, break_on_hyphens=False,
                        subsequent_indent="    ")
  return " \\\n".join(lines)


def markdown_tables(path: Path) -> dict[str, list[str]]:
  """A markdown report's tables by the heading above them ('' before the first heading)."""
  sections, heading = {}, ""
  for line in path.read_text().splitlines():
    if line.startswith("#"):
      heading = line.lstrip("#").strip()
    elif line.startswith("|"):
      sections.setdefault(heading, []).append(line)
  return sections


def parse_rows(lines: list[str]) -> list[dict]:
  keys = [c.strip() for c in lines[0].strip("|").split("|")]
  return [dict(zip(keys, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


# ---- iTransformer ---------------------------------------------------------------------------------


def itransformer_etth1_96(results_dir: Path) -> list[str]:
  r = load("itransformer_etth1_96.json", results_dir)
  official, zoo = r["official"], r["zoo"]
  versions = f"zoo: {r['versions']['zoo']}; official: {r['versions']['official']}"
  env = dict(date=r["date"], device=r["device"], conditions=r["conditions"], command=r["command"])
  wall = zoo["wall_s"] / official["wall_s"]
  per_epoch = (official["wall_s"] / official["epochs"], zoo["wall_s"] / zoo["epochs"])
  return header(env, versions) + table(
      ["ETTh1 96->96", "official (PyTorch)", "zoo (JAX)", "zoo / official"],
      [["wall time, whole run (s)", f"{official['wall_s']:.1f}", f"{zoo['wall_s']:.1f}",
        f"{wall:.3f} ({1 / wall:.1f}x shorter)"],
       ["train windows/s (median over the run)", f"{official['train_windows_per_s']:.0f}",
        f"{zoo['train_windows_per_s']:.0f}",
        f"{zoo['train_windows_per_s'] / official['train_windows_per_s']:.2f}x"],
       ["epochs run (early stopping)", official["epochs"], f"{zoo['epochs']:.0f}", ""],
       ["wall time per epoch run (s)", f"{per_epoch[0]:.1f}", f"{per_epoch[1]:.1f}",
        f"{per_epoch[1] / per_epoch[0]:.2f}"],
       ["test MSE / MAE", f"{official['test_mse']:.4f} / {official['test_mae']:.4f}",
        f"{zoo['test_mse']:.4f} / {zoo['test_mae']:.4f}", ""]])


def itransformer_reproduction(results_dir: Path) -> list[str]:
  report = results_dir / "itransformer_reproduction.md"
  written = re.search(r"written (\d{4}-\d\d-\d\d \d\d:\d\d)", report.read_text()).group(1)
  tail = [line for line in report.read_text().splitlines() if line.endswith("settings pass.")]
  return [f"Table of `results/itransformer_reproduction.md` (written {written}):", "",
          *next(iter(markdown_tables(report).values())), "", *tail]


# ---- language modelling ---------------------------------------------------------------------------


def lm_tiny_shakespeare(results_dir: Path) -> list[str]:
  r = load("lm_tiny_shakespeare_cpu.json", results_dir)
  rows = [[f"`{m['model']}`", commas(m["params"]),
           " / ".join(f"{v:.3f}" for v in m["val_loss"].values()), f"{m['val_perplexity']:.2f}",
           f"{m['val_bits_per_byte']:.3f}", f"{m['test_loss']:.3f}",
           f"{m['test_bits_per_byte']:.3f}", f"{m['test_accuracy']:.3f}",
           f"{commas(m['train_tokens_per_s_median'])} / {commas(m['train_tokens_per_s_max'])}",
           m["wall_s"]] for m in r["rows"]]
  steps = " / ".join(r["rows"][0]["val_loss"])
  return header(r["environment"]) + table(
      ["model", "params", f"val loss (nats/byte) step {steps}", "val PPL", "val bits/byte",
       "test loss", "test bits/byte", "test acc.", "train tokens/s in the run (median / max)",
       "wall (s)"], rows)


def lm_train_step(results_dir: Path) -> list[str]:
  r = load("linear_attention_train_step_cpu.json", results_dir)
  params = {m["model"]: m["params"]
            for m in load("lm_tiny_shakespeare_cpu.json", results_dir)["rows"]}
  rows = [[f"`{m['model']}`", commas(params[m["model"]]), m["batch"], f"{m['median_step_s']:.3f}",
           commas(m["tokens_per_s"]), ", ".join(f"{s:.3f}" for s in m["rounds_s"])]
          for m in r["rows"]]
  return header(r["environment"]) + table(
      ["model", "params", "batch (sequences x tokens)", "step (s)", "tokens/s", "rounds (s)"], rows)


# ---- model throughput -----------------------------------------------------------------------------


def models_maxvit_vs_timm(results_dir: Path) -> list[str]:
  runs = [("zoo kept, timm default (each as it ships)", load("models_maxvit_cpu.json", results_dir)),
          ("both kept (equal footing)", load("models_maxvit_cpu_both_kept.json", results_dir))]
  env = dict(runs[0][1]["environment"])
  env["command"] = [run["environment"]["command"] for _, run in runs]
  rows, per_round = [], []
  for label, run in runs:
    zoo, timm = run["rows"]
    for i, r in enumerate((zoo, timm)):
      ratios = ([f"{zoo['forward_zoo_over_timm']:.2f}", f"{zoo['train_zoo_over_timm']:.2f}"]
                if i == 0 else ["", ""])
      rows.append([label if i == 0 else "", r["implementation"], commas(r["params"]), r["batch"],
                   f"{r['forward_per_s']:.2f}", f"{r['forward_ms']:.0f}", f"{r['train_per_s']:.2f}",
                   f"{r['train_step_ms']:.0f}",
                   f"{r['forward_cpu_per_wall']:.2f} / {r['train_cpu_per_wall']:.2f}", *ratios])
    for k, (z, t) in enumerate(zip(zoo["rounds"], timm["rounds"])):
      per_round.append([label if k == 0 else "", k + 1, f"{z['forward_ms']:.0f}",
                        f"{t['forward_ms']:.0f}", f"{zoo['forward_zoo_over_timm_rounds'][k]:.2f}",
                        f"{z['train_step_ms']:.0f}", f"{t['train_step_ms']:.0f}",
                        f"{zoo['train_zoo_over_timm_rounds'][k]:.2f}"])
  settings = (f"float32, batch {runs[0][1]['rows'][0]['batch']}, {env['rounds']} rounds of "
              f"{env['reps']} timed calls, zoo and timm alternating; torch threads "
              f"{env['torch_threads']}, XLA:CPU on the {env['cpu_affinity']} cores the process may use")
  return header(env) + [f"Settings: {settings}.", ""] + table(
      ["glibc malloc", "implementation", "params", "batch", "forward ex/s", "forward ms",
       "train ex/s", "train step ms", "cores busy fwd / train", "zoo/timm fwd", "zoo/timm train"],
      rows) + ["", "Per round (ms; ratio = zoo/timm examples/s):", ""] + table(
      ["glibc malloc", "round", "zoo fwd", "timm fwd", "fwd ratio", "zoo train", "timm train",
       "train ratio"], per_round)


def models_hornet_biformer(results_dir: Path) -> list[str]:
  run = load("models_hornet_biformer_cpu.json", results_dir)
  env = run["environment"]
  rows = [[r["model"], commas(r["params"]), r["dtype"], r["batch"], f"{r['forward_per_s']:.2f}",
           f"{r['forward_ms']:.0f}", f"{r['train_per_s']:.2f}", f"{r['train_step_ms']:.0f}",
           f"{r['forward_cpu_per_wall']:.2f} / {r['train_cpu_per_wall']:.2f}"] for r in run["rows"]]
  return header(env) + [f"Settings: {env['rounds']} round, median of {env['reps']} timed calls.",
                        ""] + table(
      ["model", "params", "dtype", "batch", "forward ex/s", "forward ms", "train ex/s",
       "train step ms", "cores busy fwd / train"], rows)


# ---- ops ------------------------------------------------------------------------------------------


def ops_suite(name: str):
  def render(results_dir: Path) -> list[str]:
    run = load(name, results_dir)
    env = run["environment"]
    lines = header(env)
    if env.get("glibc_tunables"):
      lines += [f"`GLIBC_TUNABLES={env['glibc_tunables']}`", ""]
    rows = [[r["case"], r["implementation"], r["passes"], g3(r["median_ms"]),
             f"{g3(r['p10_ms'])}-{g3(r['p90_ms'])}", g3(r["temp_mib"]), f"{r['speedup']:.2f}"]
            for r in run["rows"]]
    return lines + table(["case", "implementation", "pass", "median ms", "p10-p90 ms", "temp MiB",
                          f"speedup vs {run['baseline']}"], rows)
  render.sources = [name]
  return render


# ---- linear attention -----------------------------------------------------------------------------


def linear_attention_scaling(results_dir: Path) -> list[str]:
  run = load("linear_attention_scaling_cpu.json", results_dir)
  cells = {(r["op"], r["length"], r["passes"]): r for r in run["rows"]}
  rows = []
  for length in sorted({r["length"] for r in run["rows"]}):
    row = [f"{length:,}"]
    for op in ("lightning", "softmax"):
      for passes in ("fwd", "fwd+bwd"):
        r = cells[(op, length, passes)]
        row.append(f"not run ({r['temp_mib'] / 1024:.1f} GiB scratch)" if "skipped" in r
                   else f"{r['us_per_token']:.2f}")
    both = [cells[(op, length, "fwd+bwd")] for op in ("softmax", "lightning")]
    ratio = both[0]["us_per_token"] / both[1]["us_per_token"] if "skipped" not in both[0] else None
    row.append("" if ratio is None else f"{ratio:.2f}" if ratio < 10 else f"{ratio:.1f}")
    rows.append(row)
  summary = [f"- {key}: {value:.1f}" if isinstance(value, float) else f"- {key}: {value}"
             for key, value in run["summary"].items()]
  return header(run["environment"]) + table(
      ["L", "lightning fwd (us/token)", "lightning fwd+bwd (us/token)", "softmax fwd (us/token)",
       "softmax fwd+bwd (us/token)", "softmax / lightning, fwd+bwd"], rows) + ["", *summary]


def linear_attention_decode(results_dir: Path) -> list[str]:
  run = load("linear_attention_decode_cpu.json", results_dir)
  rows = [[f"`{r['model']}`", f"{r['new_tokens']:,}", f"{r['median_s']:.3f}",
           commas(r["tokens_per_s"]), commas(r["cache_kib"]), commas(r["temp_kib"]),
           r["calls_timed"]] for r in run["rows"]]
  return header(run["environment"]) + table(
      ["model", "new tokens", "time (s)", "tokens/s", "state / cache (KiB)",
       "compiled scratch (KiB)", "calls timed"], rows)


# ---- training runs --------------------------------------------------------------------------------


def fashion_mnist(results_dir: Path) -> list[str]:
  run = load("fashion_mnist_cpu.json", results_dir)
  env = dict(run["environment"], date="each run's, in the table",
             command=[r["command"] for r in run["rows"]])
  rows, conditions = [], []
  for r in run["rows"]:
    acc = r["test_accuracy_per_epoch"]
    cpu = (f"{r['cpu_min']} ({r['cpu_user_s']} s user + {r['cpu_system_s']} s system)"
           if r["cpu_min"] is not None else "-")
    wall = f"{r['wall_min']}" + (f" ({r['train_py_s']} s in train.py)" if r["train_py_s"] else "")
    rows.append([f"`{r['config']}`", commas(r["params"]), r["batch"], f"{r['steps']:,}",
                 " / ".join(f"{a:.4f}" for a in acc), f"{100 * acc[-1]:.2f} %", wall, cpu,
                 f"{r['images_per_s_median']} ({r['images_per_s_range']})", r["date"]])
    conditions.append(f"- `{r['config']}`: {r['model']}; {r['conditions']}.")
  return header(env) + table(
      ["config", "params", "batch", "steps", "test accuracy, epochs 1 / 2 / 3 / 4", "final",
       "wall (min)", "CPU (min)", "train images/s, median (range)", "date"], rows) + [
           "", *conditions]


def matformer_tiny_shakespeare(results_dir: Path) -> list[str]:
  run = load("matformer_tiny_shakespeare.json", results_dir)
  return header(run["environment"]) + [*(results_dir / "matformer_tiny_shakespeare.md").read_text().splitlines(),
                        "", "Elastic sweep of the summed-loss model, balanced Mix'n'Match "
                        "(`results/matformer_tiny_shakespeare_elastic.md`, plot "
                        "`results/matformer_tiny_shakespeare_elastic.png`):", "",
                        *(results_dir / "matformer_tiny_shakespeare_elastic.md").read_text()
                        .splitlines()]


def matformer_fashion_mnist(results_dir: Path) -> list[str]:
  run = load("matformer_fashion_mnist.json", results_dir)
  return header(run["environment"]) + [*(results_dir / "matformer_fashion_mnist.md").read_text().splitlines(),
                        "", "Mix'n'Match (`results/matformer_fashion_mnist_elastic.md`, plot "
                        "`results/matformer_fashion_mnist_elastic.png`):", "",
                        *(results_dir / "matformer_fashion_mnist_elastic.md").read_text()
                        .splitlines()]


# ---- scale: sharding, TPU compiles, kernels -------------------------------------------------------


def sharding(results_dir: Path) -> list[str]:
  run = load("sharding_cpu8.json", results_dir)
  rows = [[r["family"], f"{r['state_mib']:.2f}", f"{r['fsdp8_state_share']:.3f}",
           f"{r['fsdp8_loss_delta']:.1e}", f"{r['mesh222_state_share']:.3f}",
           f"{r['mesh222_loss_delta']:.1e}"] for r in run["rows"]]
  return header(run["environment"]) + table(
      ["family", "params + AdamW state (MiB)", "fsdp=8: state on one device", "fsdp=8: loss Δ",
       "data=2, fsdp=2, tensor=2: state on one device", "2x2x2: loss Δ"], rows)


def aot_tpu(results_dir: Path) -> list[str]:
  run = load("aot_tpu.json", results_dir)
  env = dict(run["environment"], command=[r["command"] for r in run["rows"]])
  keys = ["topology", "params", "examples", "model", "optimizer", "temporaries", "total_hbm",
          "tflop", "gb_accessed", "mosaic_kernels", "compile_s"]
  rows = [[r["config"], *(commas(r[k]) if k == "params" else r[k] for k in keys)]
          for r in run["rows"]]
  evals = [f"- {r['config']} ({r['topology']}): {r['eval_step']}" for r in run["rows"]
           if r["eval_step"]]
  return header(env) + table(
      ["config", "topology, mesh", "params", "examples", "model", "optimizer", "temporaries",
       "total / HBM", "TFLOP", "GB accessed", "Mosaic kernels (train)", "compile s"], rows) + [
           "", "Eval step, per chip:", "", *evals, "",
           f"TNL-7B without FSDP, what `aot.py` prints before exiting 1: `{run['data_fit_error']}`"]


def kernel_compiles_gpu(results_dir: Path) -> list[str]:
  """sm_90, per case and dtype: the range over its kernels (every kernel: compile_report.md)."""
  rows = parse_rows(markdown_tables(results_dir / "compile_report.md")["Triton, sm_90"])
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["case"], r["dtype"]), []).append(r)

  def span(rs, key):
    values = sorted(int(r[key]) for r in rs)
    return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}-{values[-1]}"

  out = [[case, dtype, len(rs), span(rs, "registers"), span(rs, "spill_stores"),
          span(rs, "wgmma"), span(rs, "mma_sync")] for (case, dtype), rs in groups.items()]
  return table(["case", "dtype", "kernels", "registers", "spill stores (B)", "wgmma",
                "mma.sync"], out)


def kernel_compiles_tpu(results_dir: Path) -> list[str]:
  """v5e:2x2, per case and dtype: through the dispatch ("auto") and the zoo's kernel by name."""
  rows = parse_rows(markdown_tables(results_dir / "compile_report.md")["Mosaic, v5e:2x2"])
  by_case: dict[tuple, dict] = {}
  for r in rows:
    by_case.setdefault((r["case"], r["dtype"]), {})[r["implementation"]] = r

  def cell(r):
    if r["compiles"] != "True":  # the report keeps the error's start: its type and last clause
      return f"{r['error'].split(':')[0]}: {r['error'].rstrip(' (:').split(': ')[-1]}"
    vmem = [int(v.rsplit(" ", 1)[1]) for v in r["vmem_kib"].split(", ") if " " in v]
    return (f"{r['temp_mib']} MiB temp, VMEM {max(vmem)} KiB" if vmem
            else f"{r['temp_mib']} MiB temp, no kernel (XLA path)")

  out = [[case, dtype, cell(impl["auto"]), cell(impl["pallas"])]
         for (case, dtype), impl in by_case.items()]
  return table(["case", "dtype", "dispatch (auto): temp, largest kernel VMEM",
                "the zoo's kernel by name"], out)


def window_passes(results_dir: Path) -> list[str]:
  sections = markdown_tables(results_dir / "compile_report.md")
  return ["On a GPU (MaxViT-T stage 1 at batch 32, bf16):", "",
          *sections["Window attention on a GPU: HBM passes over q"], "",
          "On v5e:2x2 (stage-1 block attention at batch 128, 32 images a chip, bf16), per chip:", "",
          *sections["Window attention on v5e:2x2: HBM passes over q and grid steps per chip"]]


def lightning_cost_tpu(results_dir: Path) -> list[str]:
  run = load("lightning_cost_tpu.json", results_dir)
  rows = [[r["path"], r["fwd_gflop"], r["fwd_mb"], r["fwd_bwd_gflop"], r["fwd_bwd_mb"],
           r["sequential_steps"]] for r in run["rows"]]
  return header(run["environment"]) + table(
      ["", "fwd GFLOP", "fwd MB accessed", "fwd+bwd GFLOP", "fwd+bwd MB accessed",
       "sequential steps"], rows)


# ---- robustness and loading -----------------------------------------------------------------------


def kill_campaign(results_dir: Path) -> list[str]:
  run = load("kill_campaign_cpu.json", results_dir)
  rows = [[r["recipe"], f"`{r['config']}`", f"{r['steps']:,}", r["checkpoint_every"], r["SIGKILL"],
           r["SIGKILL_while_saving"], r["SIGTERM"], r["SIGINT"], r["ended_as_expected"],
           r["params"], r["optimizer_state"], r["final_metrics"]] for r in run["rows"]]
  return header(run["environment"]) + table(
      ["recipe", "config", "steps", "checkpoint every", "SIGKILL", "SIGKILL while saving",
       "SIGTERM", "SIGINT", "ended as expected", "params", "optimizer state", "final metrics"],
      rows)


def checkpoint_save(results_dir: Path) -> list[str]:
  run = load("checkpoint_save_cpu.json", results_dir)
  state = run["state"]
  saves = [[s["save"], "-" if s["checksum_pass_ms"] is None else f"{s['checksum_pass_ms']} ms",
            f"{s['save_returns_ms']} ms", f"{s['written_ms']} ms"] for s in run["save"]]
  passes = [[p["version"], f"{p['first_s']:.2f} s", f"{p['later_ms']} ms"]
            for p in run["checksum_pass"]]
  return header(run["environment"]) + [
      f"State: {state['arrays']} arrays, {state['mib']} MiB of params and AdamW state "
      f"({state['shapes_and_dtypes']} shapes and dtypes).", ""] + table(
      ["", "checksum pass", "`save` returns", "written"], saves) + [""] + table(
      ["checksum pass", "first pass (compile included)", "later pass"], passes)


def pretrained_load(results_dir: Path) -> list[str]:
  run = load("pretrained_load_cpu.json", results_dir)
  env = dict(run["environment"])
  env["device"] = f"{env['device']}, {env['cores']} cores"
  return header(env) + [f"Model: `{run['model']}`.", ""] + table(
      ["load", "seconds", "conversions"],
      [[r["load"], f"{r['seconds']:.3f}", r["conversions"]] for r in run["rows"]])


# ---- the registry and the CLI ---------------------------------------------------------------------


def _sources(fn, *names):
  fn.sources = list(names)
  return fn


TABLES = {
    "itransformer_etth1_96": _sources(itransformer_etth1_96, "itransformer_etth1_96.json"),
    "itransformer_reproduction": _sources(itransformer_reproduction,
                                          "itransformer_reproduction.md"),
    "lm_tiny_shakespeare": _sources(lm_tiny_shakespeare, "lm_tiny_shakespeare_cpu.json"),
    "lm_train_step": _sources(lm_train_step, "linear_attention_train_step_cpu.json",
                              "lm_tiny_shakespeare_cpu.json"),
    "models_maxvit_vs_timm": _sources(models_maxvit_vs_timm, "models_maxvit_cpu.json",
                                      "models_maxvit_cpu_both_kept.json"),
    "models_hornet_biformer": _sources(models_hornet_biformer, "models_hornet_biformer_cpu.json"),
    "ops_window_cpu_steady_heap": ops_suite("ops_window_cpu_steady_heap.json"),
    "ops_window_cpu": ops_suite("ops_window_cpu.json"),
    "ops_routing_cpu": ops_suite("ops_routing_cpu.json"),
    "ops_depthwise_cpu": ops_suite("ops_depthwise_cpu.json"),
    "linear_attention_scaling": _sources(linear_attention_scaling,
                                         "linear_attention_scaling_cpu.json"),
    "linear_attention_decode": _sources(linear_attention_decode,
                                        "linear_attention_decode_cpu.json"),
    "fashion_mnist": _sources(fashion_mnist, "fashion_mnist_cpu.json"),
    "matformer_tiny_shakespeare": _sources(
        matformer_tiny_shakespeare, "matformer_tiny_shakespeare.json",
        "matformer_tiny_shakespeare.md", "matformer_tiny_shakespeare_elastic.md"),
    "matformer_fashion_mnist": _sources(
        matformer_fashion_mnist, "matformer_fashion_mnist.json", "matformer_fashion_mnist.md",
        "matformer_fashion_mnist_elastic.md"),
    "sharding": _sources(sharding, "sharding_cpu8.json"),
    "aot_tpu": _sources(aot_tpu, "aot_tpu.json"),
    "kernel_compiles_gpu": _sources(kernel_compiles_gpu, "compile_report.md"),
    "kernel_compiles_tpu": _sources(kernel_compiles_tpu, "compile_report.md"),
    "window_passes": _sources(window_passes, "compile_report.md"),
    "lightning_cost_tpu": _sources(lightning_cost_tpu, "lightning_cost_tpu.json"),
    "kill_campaign": _sources(kill_campaign, "kill_campaign_cpu.json"),
    "checkpoint_save": _sources(checkpoint_save, "checkpoint_save_cpu.json"),
    "pretrained_load": _sources(pretrained_load, "pretrained_load_cpu.json"),
}


def render(text: str, results_dir: Path = RESULTS_DIR) -> str:
  """`text` (RESULTS.md) with every generated block rendered again from `results_dir`."""
  def block(match):
    name = match.group("name")
    if name not in TABLES:
      raise ValueError(f"RESULTS.md names table {name!r}; results_table.TABLES has "
                       f"{sorted(TABLES)}")
    return match.group(1) + "\n".join(TABLES[name](results_dir)) + "\n" + match.group(4)
  return BLOCK.sub(block, text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 with a diff if RESULTS.md is out of date")
  args = parser.parse_args(argv)
  text = RESULTS_MD.read_text()
  rendered = render(text)
  if rendered == text:
    print("RESULTS.md is up to date")
    return 0
  if args.check:
    sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True),
                                               "RESULTS.md", "rendered from results/"))
    return 1
  RESULTS_MD.write_text(rendered)
  print("RESULTS.md rewritten from results/")
  return 0


if __name__ == "__main__":
  sys.exit(main())
