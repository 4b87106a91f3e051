r"""iTransformer ETTh1 96->96: the official PyTorch code vs the zoo, one after the other on this machine.

  python benchmarks/itransformer_vs_official.py --official_dir ../official/iTransformer \
      --python_official ../torchvenv/bin/python --data_dir ../shared/data/ett

(a) runs the official recipe (scripts/multivariate_forecasting/ETT/iTransformer_ETTh1.sh, pred_len 96)
with `run.py` in a subprocess, (b) runs `train.py --config configs/itransformer.py:etth1_96` in a
subprocess, then prints a table and writes it as JSON (`--out`). See benchmarks/README.md for how to
get the official code (it is never copied into this repository).

Training throughput: official = (steps x batch) / the "Epoch: k cost time" it prints, median over
epochs (this includes its DataLoader start-up, as its own timer does); zoo = median of
`perf/examples_per_sec` in metrics.jsonl (first compile excluded). Wall time = the whole subprocess,
data loading, validation and testing included. Standard library only.
"""
import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The first block of the official ETTh1 script, verbatim apart from the data path.
OFFICIAL_ARGS = [
    "--is_training", "1", "--data_path", "ETTh1.csv", "--model_id", "ETTh1_96_96",
    "--model", "iTransformer", "--data", "ETTh1", "--features", "M", "--seq_len", "96",
    "--pred_len", "96", "--e_layers", "2", "--enc_in", "7", "--dec_in", "7", "--c_out", "7",
    "--des", "Exp", "--d_model", "256", "--d_ff", "256", "--itr", "1",
]
OFFICIAL_BATCH = 32
ZOO_CONFIG = "configs/itransformer.py:etth1_96"
# The official layers/SelfAttention_Family.py imports reformer_pytorch (only iReformer uses it).
REFORMER_STUB = ("class LSHSelfAttention:\n"
                 "  def __init__(self, *a, **k):\n"
                 "    raise ImportError('reformer_pytorch is stubbed by the zoo benchmark')\n")


def fail(msg):
  sys.exit(f"error: {msg}")


def check_paths(args):
  if not os.path.isfile(os.path.join(args.official_dir, "run.py")):
    fail(f"--official_dir {args.official_dir!r} has no run.py; clone github.com/thuml/iTransformer "
         "outside this repository (see benchmarks/README.md)")
  for flag in ("python_official", "python_zoo"):
    path = getattr(args, flag)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
      fail(f"--{flag} {path!r} is not an executable file")
  if not os.path.isfile(os.path.join(args.data_dir, "ETTh1.csv")):
    fail(f"--data_dir {args.data_dir!r} has no ETTh1.csv")
  if not args.skip_zoo and not os.path.isfile(os.path.join(REPO, "train.py")):
    fail(f"no train.py in {REPO}")


def run_logged(cmd, cwd, log_path, env=None):
  """Runs cmd, sending its output to log_path; returns (wall seconds, output text)."""
  print(f"$ (cd {cwd} && {' '.join(cmd)})  > {log_path}", flush=True)
  start = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
  wall = time.perf_counter() - start
  with open(log_path) as f:
    text = f.read()
  if proc.returncode != 0:
    fail(f"{cmd[1]} exited with {proc.returncode}; last lines of {log_path}:\n" + "\n".join(text.splitlines()[-20:]))
  return wall, text


def python_version_of(python, module):
  out = subprocess.run([python, "-c", f"import {module}; print({module}.__version__)"],
                       capture_output=True, text=True)
  return out.stdout.strip() or None


def run_official(args, workdir):
  cwd = os.path.join(workdir, "official")  # its checkpoints/, results/, test_results/ land here
  os.makedirs(cwd, exist_ok=True)
  env = dict(os.environ)
  if subprocess.run([args.python_official, "-c", "import reformer_pytorch"], capture_output=True).returncode:
    stub = os.path.join(workdir, "stubs", "reformer_pytorch")
    os.makedirs(stub, exist_ok=True)
    with open(os.path.join(stub, "__init__.py"), "w") as f:
      f.write(REFORMER_STUB)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(stub), env.get("PYTHONPATH")]))
  cmd = [args.python_official, "-u", os.path.join(os.path.abspath(args.official_dir), "run.py"),
         "--root_path", os.path.abspath(args.data_dir) + os.sep, *OFFICIAL_ARGS]
  wall, text = run_logged(cmd, cwd, os.path.join(workdir, "official.log"), env)

  epoch_times = [float(t) for t in re.findall(r"Epoch: \d+ cost time: ([\d.]+)", text)]
  steps = re.search(r"Epoch: \d+, Steps: (\d+)", text)
  final = re.search(r"mse:([\d.eE+-]+), mae:([\d.eE+-]+)", text)
  if not (epoch_times and steps and final):
    fail(f"could not parse the official output in {workdir}/official.log")
  windows = int(steps.group(1)) * OFFICIAL_BATCH
  return {
      "wall_s": wall,
      "epochs": len(epoch_times),
      "epoch_train_s": epoch_times,
      "train_windows_per_epoch": windows,
      "train_windows_per_s": statistics.median(windows / t for t in epoch_times),
      "train_windows_per_s_best_epoch": windows / min(epoch_times),  # least disturbed by other load
      "test_mse": float(final.group(1)),
      "test_mae": float(final.group(2)),
      "torch": python_version_of(args.python_official, "torch"),
  }


def run_zoo(args, workdir):
  zoo_dir = os.path.join(workdir, "zoo")
  if os.path.exists(os.path.join(zoo_dir, "final_metrics.json")):
    fail(f"{zoo_dir} already holds a finished run (train.py would resume it); use a fresh --workdir")
  cmd = [args.python_zoo, "train.py", "--config", args.zoo_config, "--workdir", zoo_dir,
         f"--config.data.manual_dir={os.path.abspath(args.data_dir)}"]
  wall, _ = run_logged(cmd, REPO, os.path.join(workdir, "zoo.log"))
  with open(os.path.join(zoo_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(zoo_dir, "final_metrics.json")) as f:
    final = json.load(f)
  speeds = [r["perf/examples_per_sec"] for r in rows if "perf/examples_per_sec" in r]
  if not speeds:
    fail(f"no perf/examples_per_sec in {zoo_dir}/metrics.jsonl")
  return {
      "wall_s": wall,
      "epochs": final["epochs"],
      "best_step": final["best_step"],
      "train_windows_per_s": statistics.median(speeds),
      "train_windows_per_s_max": max(speeds),
      "test_mse": final["test/mse"],
      "test_mae": final["test/mae"],
      "jax": python_version_of(args.python_zoo, "jax"),
  }


def table(results):
  off, zoo = results.get("official"), results.get("zoo")
  rows = [("wall time (s)", "wall_s", "{:.1f}"), ("train windows/s", "train_windows_per_s", "{:.0f}"),
          ("epochs", "epochs", "{:.3g}"), ("test MSE", "test_mse", "{:.4f}"), ("test MAE", "test_mae", "{:.4f}")]
  lines = ["| ETTh1 96->96 | official (PyTorch) | zoo (JAX) | zoo / official |", "|---|---|---|---|"]
  for name, key, fmt in rows:
    a = fmt.format(off[key]) if off else "-"
    b = fmt.format(zoo[key]) if zoo else "-"
    ratio = f"{zoo[key] / off[key]:.3f}" if off and zoo and off[key] else "-"
    lines.append(f"| {name} | {a} | {b} | {ratio} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--official_dir", required=True, help="a checkout of thuml/iTransformer (outside this repo)")
  parser.add_argument("--python_official", required=True, help="python of a venv with torch, pandas, sklearn, einops")
  parser.add_argument("--python_zoo", default=sys.executable, help="python of the zoo's venv")
  parser.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "ett"),
                      help="folder holding ETTh1.csv")
  parser.add_argument("--workdir", default=os.path.join(REPO, "runs", f"itransformer_vs_official_{int(time.time())}"))
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "itransformer_etth1_96.json"))
  parser.add_argument("--zoo_config", default=ZOO_CONFIG, help="e.g. add ',runlocal' for a smoke test")
  parser.add_argument("--skip_official", action="store_true")
  parser.add_argument("--skip_zoo", action="store_true")
  args = parser.parse_args()
  check_paths(args)
  os.makedirs(args.workdir, exist_ok=True)

  results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
             "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": shlex.join(["python", *sys.argv])}
  if not args.skip_official:
    results["official"] = run_official(args, args.workdir)
  if not args.skip_zoo:
    results["zoo"] = run_zoo(args, args.workdir)
  results["table"] = table(results)
  print(results["table"])
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
