"""The benchmark scripts' own logic (no timing): the iTransformer reproduction table."""
import json
import os

import pytest

from conftest import load_benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reproduce():
  return load_benchmark("itransformer_reproduce")


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


# --- benchmarks/gpu_check.sh and its report ------------------------------------------------------


def test_gpu_check_refuses_a_machine_without_a_gpu(tmp_path):
  import subprocess
  import sys
  result = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"),
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"},
                          timeout=120)
  assert result.returncode == 1
  assert result.stderr.startswith("gpu_check.sh: expected a GPU"), result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def test_gpu_check_report_gathers_what_finished(tmp_path):
  report = load_benchmark("gpu_check_report")
  (tmp_path / "gpu.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04\n")
  (tmp_path / "tests.xml").write_text(
      '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
      '<testcase name="test_attention[dense]"/><testcase name="test_lightning_attention[2048]">'
      '<failure message="dq: max|kernel - ref_f32| = 0.5 exceeds 3 x ..."/></testcase>'
      '<testcase name="test_routing_attention[s1]"/></testsuite></testsuites>')
  rows = [dict(case="windows 2048x49 H2 hd32", implementation="pallas", passes="fwd",
               median_ms=0.25, tflops=12.0, gbps=900.0, speedup=3.0, timer="cupti"),
          dict(case="windows 2048x49 H2 hd32", implementation="cudnn", skipped="odd length")]
  (tmp_path / "ops_window.json").write_text(json.dumps(dict(
      environment={"device_kind": "NVIDIA H100 80GB HBM3"}, suite="window", baseline="xla",
      rows=rows)))
  (tmp_path / "models.json").write_text(json.dumps(dict(environment={}, rows=[dict(
      model="hornet_tiny_7x7", params=22409512, dtype="bfloat16", batch=128,
      train_step_ms=80.0, train_per_s=1600.0, forward_ms=20.0)])))
  result, markdown = report.report(tmp_path)
  assert result["tests"]["failures"] == 1 and result["tests"]["failed"][0].startswith(
      "test_lightning_attention[2048]: dq:")
  assert result["missing"] == ["ops_attention.json", "ops_routing.json", "ops_lightning.json"]
  assert result["ops"]["window"]["rows"] == rows
  assert "| windows 2048x49 H2 hd32 | pallas | fwd | 0.25 | 12 | 900 |  |  | 3 | cupti |" in markdown
  assert "| windows 2048x49 H2 hd32 | cudnn | skipped: odd length |" in markdown
  assert "| hornet_tiny_7x7 | 22409512 | bfloat16 | 128 | 80 | 1.6e+03 | 20 |" in markdown
  report.main([str(tmp_path)])
  assert json.loads((tmp_path / "gpu_check.json").read_text())["gpu"].startswith("NVIDIA H100")


# --- benchmarks/RESULTS.md, generated from benchmarks/results/ -----------------------------------


@pytest.fixture(scope="module")
def results_table():
  return load_benchmark("results_table")


def test_results_md_is_rendered_from_the_results_files(results_table):
  """Every table of RESULTS.md equals what results_table.py renders from results/: a number
  edited in one and not the other fails here (fix: `python benchmarks/results_table.py`)."""
  text = results_table.RESULTS_MD.read_text()
  rendered = results_table.render(text)
  assert rendered == text, "RESULTS.md is stale: run python benchmarks/results_table.py"
  names = [m.group("name") for m in results_table.BLOCK.finditer(text)]
  assert sorted(names) == sorted(results_table.TABLES), "a table of TABLES is missing in RESULTS.md"


def test_an_edited_result_changes_the_rendered_table(results_table, tmp_path):
  import shutil
  results = tmp_path / "results"
  shutil.copytree(results_table.RESULTS_DIR, results)
  path = results / "ops_routing_cpu.json"
  run = json.loads(path.read_text())
  run["rows"][0]["median_ms"] *= 2
  path.write_text(json.dumps(run))
  text = results_table.RESULTS_MD.read_text()
  assert results_table.render(text, results) != text
  with pytest.raises(ValueError, match="no_such_table"):
    results_table.render("<!-- table: no_such_table -->\n<!-- /table -->\n", results)


def test_every_result_file_is_shown_or_linked(results_table):
  """A file in results/ feeds a table of RESULTS.md or is linked from it or from a note."""
  used = {source for fn in results_table.TABLES.values() for source in fn.sources}
  notes = results_table.HERE / "notes"
  text = results_table.RESULTS_MD.read_text() + "".join(
      p.read_text() for p in sorted(notes.glob("*.md")))
  orphans = [p.name for p in sorted(results_table.RESULTS_DIR.iterdir())
             if p.name not in used and f"results/{p.name}" not in text]
  assert not orphans, f"results/ files that RESULTS.md neither shows nor links: {orphans}"


def test_results_md_and_notes_link_what_exists(results_table):
  import re
  here = results_table.HERE
  documents = [results_table.RESULTS_MD, *sorted((here / "notes").glob("*.md"))]
  assert len(documents) > 1, "no dated notes in benchmarks/notes/"
  slug = lambda heading: re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
  anchors = {slug(line.lstrip("#")) for line in results_table.RESULTS_MD.read_text().splitlines()
             if line.startswith("#")}
  broken = []
  for doc in documents:
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
      if target.startswith("http"):
        continue
      path, _, anchor = target.partition("#")
      if path and not (doc.parent / path).exists():
        broken.append(f"{doc.name}: {target}")
      elif anchor and not path and anchor not in anchors:
        broken.append(f"{doc.name}: {target}")
  assert not broken, f"links to nothing: {broken}"
  for note in documents[1:]:
    assert re.fullmatch(r"\d{4}-\d\d-[a-z0-9-]+\.md", note.name), f"undated note {note.name}"
