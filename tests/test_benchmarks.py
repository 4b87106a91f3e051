"""The benchmark scripts' own logic (no timing): the iTransformer reproduction table."""
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def reproduce():
  return load_script("itransformer_reproduce")


def write_final(root, dataset, horizon, seed, mse, mae):
  workdir = os.path.join(root, f"{dataset}_{horizon}_s{seed}")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump({"test/mse": mse, "test/mae": mae}, f)


@pytest.mark.parametrize("ours, verdict", [((0.396, 0.405), "pass"),     # +0.010: the bound
                                           ((0.3964, 0.405), "pass"),    # shows +0.010
                                           ((0.397, 0.405), "FAIL"),     # +0.011
                                           ((0.386, 0.416), "FAIL"),     # MAE over
                                           ((0.300, 0.300), "pass")])    # better than the paper
def test_a_setting_passes_within_a_hundredth_of_the_paper(reproduce, ours, verdict):
  row = reproduce.fmt_row("ETTh1", 96, "3/3", ours, (0.386, 0.405))
  assert row.endswith(f"| {verdict} |")


def test_table_means_the_seeds_and_averages_complete_datasets(reproduce, tmp_path):
  root = str(tmp_path)
  for seed, mse in zip((2021, 2022, 2023), (0.380, 0.386, 0.392)):
    write_final(root, "etth1", 96, seed, mse, 0.404)
  for horizon, (mse, mae) in zip(reproduce.HORIZONS, reproduce.PAPER["exchange"]):
    write_final(root, "exchange", horizon, 2023, mse + 0.002, mae)
  table = reproduce.build_table(root, ["etth1", "exchange"], list(reproduce.HORIZONS))
  lines = table.splitlines()
  assert "| ETTh1 | 96 | 3/3 | 0.386 | 0.404 | 0.386 | 0.405 | +0.000 | -0.001 | pass |" in lines
  assert "| ETTh1 | 192 | 0/3 | - | - | 0.441 | 0.436 | - | - | pending |" in lines
  assert not any(line.startswith("| **ETTh1** | Avg") for line in lines)   # 1 of 4 horizons
  paper_avg = reproduce.PAPER_AVG["exchange"]
  average = next(line for line in lines if line.startswith("| **Exchange** | Avg"))
  assert f"| {paper_avg[0] + 0.002:.3f} | {paper_avg[1]:.3f} |" in average
  assert lines[-1] == "5/5 finished settings pass."   # the Avg rows are not settings
