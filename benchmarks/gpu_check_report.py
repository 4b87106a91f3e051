"""Gathers what benchmarks/gpu_check.sh wrote into one JSON and one markdown table.

    python benchmarks/gpu_check_report.py OUT    # reads OUT/*, writes OUT/gpu_check.{json,md}

Reads the GPU's name (gpu.txt), the GPU tests' JUnit XML (tests.xml), the ops suites
(ops_<suite>.json, benchmarks/ops.py rows) and the train steps (models.json, benchmarks/models.py
rows). A step that did not finish (its time limit, an error) is listed as missing.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

SUITES = ("attention", "window", "routing", "lightning")


def _tests(path: Path) -> dict:
  if not path.exists():
    return {"missing": str(path.name)}
  root = ElementTree.parse(path).getroot()
  suite = root if root.tag == "testsuite" else root.find("testsuite")
  counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
  failed = []
  for case in suite.iter("testcase"):
    problem = case.find("failure") if case.find("failure") is not None else case.find("error")
    if problem is not None:
      failed.append(f"{case.get('name')}: {problem.get('message', '')[:300]}")
  return dict(counts, failed=failed)


def _cell(value) -> str:
  return f"{value:.3g}" if isinstance(value, float) else str(value)


def _table(rows: list[dict], keys: list[str]) -> list[str]:
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  for row in rows:
    if "skipped" in row:
      lines.append(f"| {row.get('case', '')} | {row.get('implementation', '')} | skipped: "
                   f"{row['skipped']} |")
    else:
      lines.append("| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |")
  return lines


def report(out: Path) -> tuple[dict, str]:
  result = {"gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None,
            "tests": _tests(out / "tests.xml"), "ops": {}, "missing": []}
  lines = [f"# GPU check: {result['gpu']}", ""]
  tests = result["tests"]
  if "missing" in tests:
    result["missing"].append(tests["missing"])
    lines += ["Tests: did not finish.", ""]
  else:
    lines += [f"Tests (tests/test_gpu.py): {tests['tests']} run, {tests['failures']} failed, "
              f"{tests['errors']} errors, {tests['skipped']} skipped.", ""]
    lines += [f"- failed: {name}" for name in tests["failed"]] + ([""] if tests["failed"] else [])
  keys = ["case", "implementation", "passes", "median_ms", "tflops", "gbps", "pct_peak_flops",
          "pct_peak_hbm", "speedup", "timer"]
  for suite in SUITES:
    path = out / f"ops_{suite}.json"
    if not path.exists():
      result["missing"].append(path.name)
      lines += [f"## ops: {suite}", "", "did not finish", ""]
      continue
    data = json.loads(path.read_text())
    result["ops"][suite] = data
    result.setdefault("environment", data["environment"])
    lines += [f"## ops: {suite} (speedup against {data['baseline']})", ""]
    lines += _table(data["rows"], keys) + [""]
  path = out / "models.json"
  if path.exists():
    result["models"] = json.loads(path.read_text())
    lines += ["## train steps, bf16", ""]
    lines += _table(result["models"]["rows"], ["model", "params", "dtype", "batch",
                                               "train_step_ms", "train_per_s", "forward_ms"]) + [""]
  else:
    result["missing"].append(path.name)
    lines += ["## train steps", "", "did not finish", ""]
  if result["missing"]:
    lines += ["Missing: " + ", ".join(result["missing"]), ""]
  return result, "\n".join(lines)


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    sys.exit("usage: python benchmarks/gpu_check_report.py OUT")
  out = Path(argv[0])
  result, markdown = report(out)
  (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
  (out / "gpu_check.md").write_text(markdown)
  print(markdown)


if __name__ == "__main__":
  main()
