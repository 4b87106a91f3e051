r"""Reproduces the iTransformer paper's long-term forecasting table (lookback 96) with the zoo's train.py.

  python benchmarks/itransformer_reproduce.py                 # every run below, one at a time
  python benchmarks/itransformer_reproduce.py --jobs 2        # two runs in parallel
  python benchmarks/itransformer_reproduce.py --datasets etth1 --horizons 96 192
  python benchmarks/itransformer_reproduce.py --table_only    # just rebuild the table from finished runs

Runs `train.py --config configs/itransformer.py:<dataset>_<horizon>` for ETTh1 (seeds 2021, 2022,
2023; the table shows the mean), ETTh2, ETTm1, ETTm2, Weather and Exchange (seed 2023) at horizons
96/192/336/720, each in `<root>/<dataset>_<horizon>_s<seed>`. A run whose final_metrics.json exists
is skipped, so rerunning the command resumes (train.py itself resumes an interrupted run). Then it
writes the ours-vs-paper table (paper: ICLR 2024, Tables 9/10) to
benchmarks/results/itransformer_reproduction.md and prints it. A setting passes when
ours - paper <= +0.01 for both MSE and MAE. Standard library only.
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HORIZONS = (96, 192, 336, 720)
TOLERANCE = 0.01
# dataset key in configs/itransformer.py -> (name in the table, folder under shared/data, seeds)
DATASETS = {
    "etth1": ("ETTh1", "ett", (2021, 2022, 2023)),
    "etth2": ("ETTh2", "ett", (2023,)),
    "ettm1": ("ETTm1", "ett", (2023,)),
    "ettm2": ("ETTm2", "ett", (2023,)),
    "weather": ("Weather", "weather", (2023,)),
    "exchange": ("Exchange", "exchange_rate", (2023,)),
}
# Paper (lookback 96) MSE, MAE per horizon 96/192/336/720 [spec §A3].
PAPER = {
    "etth1": ((0.386, 0.405), (0.441, 0.436), (0.487, 0.458), (0.503, 0.491)),
    "etth2": ((0.297, 0.349), (0.380, 0.400), (0.428, 0.432), (0.427, 0.445)),
    "ettm1": ((0.334, 0.368), (0.377, 0.391), (0.426, 0.420), (0.491, 0.459)),
    "ettm2": ((0.180, 0.264), (0.250, 0.309), (0.311, 0.348), (0.412, 0.407)),
    "weather": ((0.174, 0.214), (0.221, 0.254), (0.278, 0.296), (0.358, 0.347)),
    "exchange": ((0.086, 0.206), (0.177, 0.299), (0.331, 0.417), (0.847, 0.691)),
}
PAPER_AVG = {"etth1": (0.454, 0.447), "etth2": (0.383, 0.407), "ettm1": (0.407, 0.410),
             "ettm2": (0.288, 0.332), "weather": (0.258, 0.278), "exchange": (0.360, 0.403)}


def run_dir(root, dataset, horizon, seed):
  return os.path.join(root, f"{dataset}_{horizon}_s{seed}")


def train_one(args, dataset, horizon, seed):
  """Runs one setting unless it already finished; returns a one-line status."""
  workdir = run_dir(args.root, dataset, horizon, seed)
  if os.path.exists(os.path.join(workdir, "final_metrics.json")):
    return f"skip {workdir} (finished)"
  os.makedirs(workdir, exist_ok=True)
  cmd = [args.python_zoo, "train.py", "--config", f"configs/itransformer.py:{dataset}_{horizon}",
         "--workdir", workdir, f"--config.seed={seed}",
         f"--config.data.manual_dir={os.path.join(args.data_root, DATASETS[dataset][1])}"]
  start = time.perf_counter()
  with open(os.path.join(workdir, "train.log"), "a") as log:
    rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
  took = time.perf_counter() - start
  return f"{'done' if rc == 0 else f'FAILED (exit {rc})'} {workdir} in {took:.0f}s" + (
      "" if rc == 0 else f"; see {workdir}/train.log")


def read_final(root, dataset, horizon, seeds):
  """Returns [(mse, mae)] of the finished seeds."""
  out = []
  for seed in seeds:
    path = os.path.join(run_dir(root, dataset, horizon, seed), "final_metrics.json")
    if os.path.exists(path):
      with open(path) as f:
        final = json.load(f)
      out.append((final["test/mse"], final["test/mae"]))
  return out


def fmt_row(name, horizon, seeds, ours, paper):
  """One markdown row; ours = (mse, mae) or None. Deltas are compared as shown (3 decimals, as the paper)."""
  if ours is None:
    return f"| {name} | {horizon} | {seeds} | - | - | {paper[0]:.3f} | {paper[1]:.3f} | - | - | pending |"
  d_mse, d_mae = (round(o - p, 3) + 0.0 for o, p in zip(ours, paper))
  mark = "pass" if d_mse <= TOLERANCE and d_mae <= TOLERANCE else "FAIL"
  return (f"| {name} | {horizon} | {seeds} | {ours[0]:.3f} | {ours[1]:.3f} | {paper[0]:.3f} | {paper[1]:.3f} "
          f"| {d_mse:+.3f} | {d_mae:+.3f} | {mark} |")


def _shown(path):
  """A path as the table shows it: relative to the repository when inside it (no machine paths)."""
  inside = os.path.abspath(path).startswith(REPO + os.sep)
  return os.path.relpath(path, REPO) if inside else os.path.basename(os.path.normpath(path))


def build_table(root, datasets, horizons):
  lines = [
      "# iTransformer reproduction (lookback 96)",
      "",
      f"Ours: `benchmarks/itransformer_reproduce.py`, runs in `{_shown(root)}`, written {time.strftime('%Y-%m-%d %H:%M')}. "
      "Paper: ICLR 2024 Tables 9/10. Test MSE / MAE on the standardised scale. "
      f"Δ = ours − paper; pass when Δ ≤ +{TOLERANCE} for both. ETTh1 is the mean over seeds 2021-2023, "
      "the others seed 2023; `seeds` counts finished runs. Avg rows appear when all four horizons are in.",
      "",
      "| dataset | H | seeds | ours MSE | ours MAE | paper MSE | paper MAE | Δ MSE | Δ MAE | |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  n_pass = n_done = 0
  for dataset in datasets:
    name, _, seeds = DATASETS[dataset]
    means = []
    for horizon in horizons:
      runs = read_final(root, dataset, horizon, seeds)
      ours = None
      if runs:
        ours = (statistics.mean(r[0] for r in runs), statistics.mean(r[1] for r in runs))
        means.append(ours)
      row = fmt_row(name, horizon, f"{len(runs)}/{len(seeds)}", ours, PAPER[dataset][HORIZONS.index(horizon)])
      n_done += ours is not None
      n_pass += row.endswith("| pass |")
      lines.append(row)
    if len(means) == len(HORIZONS):
      avg = (statistics.mean(m[0] for m in means), statistics.mean(m[1] for m in means))
      lines.append(fmt_row(f"**{name}**", "Avg", "", avg, PAPER_AVG[dataset]))
  lines += ["", f"{n_pass}/{n_done} finished settings pass."]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", default=os.path.join(REPO, "runs", "itransformer_reproduction"),
                      help="one workdir per run is made under it")
  parser.add_argument("--data_root", default=os.path.join(REPO, "..", "shared", "data"),
                      help="folder holding ett/, weather/, exchange_rate/")
  parser.add_argument("--python_zoo", default=sys.executable)
  parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
  parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
  parser.add_argument("--horizons", nargs="+", type=int, default=list(HORIZONS), choices=HORIZONS)
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "itransformer_reproduction.md"))
  parser.add_argument("--table_only", action="store_true", help="do not train, only rebuild the table")
  args = parser.parse_args()
  args.root = os.path.abspath(args.root)
  args.data_root = os.path.abspath(args.data_root)

  if not args.table_only:
    missing = [d for d in args.datasets if not os.path.isdir(os.path.join(args.data_root, DATASETS[d][1]))]
    if missing:
      sys.exit(f"error: --data_root {args.data_root!r} lacks the folders for {missing}")
    if not os.path.isfile(os.path.join(REPO, "train.py")):
      sys.exit(f"error: no train.py in {REPO}")
    runs = [(d, h, s) for d in args.datasets for h in args.horizons for s in DATASETS[d][2]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
      for future in concurrent.futures.as_completed([pool.submit(train_one, args, *r) for r in runs]):
        print(future.result(), flush=True)

  table = build_table(args.root, args.datasets, args.horizons)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(table)
  print(table)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
