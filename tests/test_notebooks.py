"""Notebooks: every notebooks/*.ipynb runs from top to bottom on its tiny settings, opens in Colab
and carries the outputs of a real run.

The code cells run in order in one namespace (no Jupyter kernel needed), with ZOO_NOTEBOOK_TINY=1,
which each notebook reads to pick small models and inputs, and matplotlib's non-interactive Agg
backend, in a fresh working directory (what a notebook writes under runs/ goes there). Lines
starting with '!' or '%' (Colab shell commands and magics, e.g. the pip install) are left out: the
test environment already has what they would install. A notebook checks its own results with
asserts.

The saved outputs come from notebooks/regenerate.py, which executes the notebooks in a Jupyter
kernel and records the settings it ran them with in `metadata.zoo.outputs`.
"""
import json
import os
import re
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
COLAB = "https://colab.research.google.com/github/"
# What stands for something a reader must fill in, and the old install forms.
PLACEHOLDERS = re.compile(r"(?i:<[^<>\n]*(url|repo|path|your)[^<>\n]*>)|#egg=|git\+<|\bTODO\b|\bXXX\b")
# Paths of the machine that ran a notebook: never in a committed file (written in pieces, since
# tests/test_repository.py reads this file for the same paths).
MACHINE_PATHS = re.compile("|".join([r"/tmp/", "/" + r"work/", r"/home/", r"/root/", r"/Users/",
                                      r"\b[A-Z]:\\(?=\w)"]))


def cells(path: Path, kind: str) -> list[str]:
  notebook = json.loads(path.read_text())
  return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == kind]


def code_cells(path: Path) -> list[str]:
  return ["\n".join(line for line in source.splitlines()
                    if not line.lstrip().startswith(("!", "%")))
          for source in cells(path, "code")]


def test_notebooks_are_found_and_honour_the_tiny_switch():
  assert NOTEBOOKS, "no notebooks/*.ipynb found"
  assert "itransformer" in {path.stem for path in NOTEBOOKS}   # the flagship family has one
  for path in NOTEBOOKS:
    # Without the switch CI would run the full-size model.
    assert any("ZOO_NOTEBOOK_TINY" in cell for cell in code_cells(path)), path.name


def repo_url(path: Path) -> str:
  """The REPO_URL that the install cell sets on its first line."""
  install = next((cell for cell in cells(path, "code")[:2] if "pip install" in cell), None)
  assert install is not None, f"{path.name}: no install cell among the first two code cells"
  match = re.fullmatch(r'REPO_URL = "(https://github\.com/[\w.-]+/[\w.-]+)"',
                       install.splitlines()[0])
  assert match, f"{path.name}: the install cell's first line must set REPO_URL, not " \
                f"{install.splitlines()[0]!r}"
  # Only where the zoo is not importable already (a checkout stays as it is), from REPO_URL.
  assert re.search(r'if importlib\.util\.find_spec\("models"\) is None:\n(  .*\n)*'
                   r'  !pip install -q "jax-paper-zoo\[notebooks\] @ git\+\{REPO_URL\}"',
                   install), f"{path.name}: the install cell must pip install from REPO_URL " \
                             "only when the zoo is not importable"
  return match.group(1)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_in_colab(path):
  url = repo_url(path)
  # The badge: first in the first cell, opening this very notebook from the repository's main.
  first = json.loads(path.read_text())["cells"][0]
  assert first["cell_type"] == "markdown"
  badge = re.match(r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/"
                   r"colab-badge\.svg\)\]\((\S+)\)", "".join(first["source"]))
  assert badge, f"{path.name}: the first cell must start with the Open in Colab badge"
  assert badge.group(1) == f"{COLAB}{url.removeprefix('https://github.com/')}/blob/main/" \
                           f"notebooks/{path.name}", badge.group(1)
  for source in cells(path, "markdown") + cells(path, "code"):
    found = PLACEHOLDERS.search(source)
    assert not found, f"{path.name}: {found.group(0)!r} in\n{source}"
  # Where the notebook says which runtime each part needs.
  assert any("GPU or TPU" in cell for cell in cells(path, "markdown")), path.name


def test_every_notebook_installs_from_one_repository():
  urls = {path.name: repo_url(path) for path in NOTEBOOKS}
  assert len(set(urls.values())) == 1, urls


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_carries_the_outputs_of_a_run(path):
  notebook = json.loads(path.read_text())
  code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
  # Executed top to bottom in one kernel, as notebooks/regenerate.py does, with plots saved.
  assert [cell["execution_count"] for cell in code] == list(range(1, len(code) + 1)), \
      f"{path.name}: not executed top to bottom; run notebooks/regenerate.py"
  outputs = [output for cell in code for output in cell["outputs"]]
  assert any("image/png" in output.get("data", {}) for output in outputs), path.name
  assert not any(output["output_type"] == "error" for output in outputs), path.name
  settings = notebook["metadata"].get("zoo", {}).get("outputs", {}).get("settings")
  assert settings in ("full", "tiny"), f"{path.name}: metadata.zoo.outputs.settings: {settings!r}"
  assert path.stat().st_size < 1_000_000, f"{path.name}: {path.stat().st_size:,} bytes"
  # The text a reader sees (sources and text outputs; images left out) names no local path.
  texts = cells(path, "markdown") + cells(path, "code") + [
      "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
      for output in outputs]
  found = next((m for m in map(MACHINE_PATHS.search, texts) if m), None)
  assert not found, f"{path.name}: a machine path in the notebook: {found.group(0)!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_tiny_settings(path, monkeypatch, tmp_path):
  sources = code_cells(path)
  if any("ZOO_TEST_DATA" in source for source in sources) and not os.environ.get("ZOO_TEST_DATA"):
    pytest.skip("ZOO_TEST_DATA (the shared/data folder of real benchmark files) is not set; the "
                "notebook would download its data")
  if os.environ.get("ZOO_TEST_DATA"):   # a relative one (the README's) must survive the chdir
    monkeypatch.setenv("ZOO_TEST_DATA", str(Path(os.environ["ZOO_TEST_DATA"]).resolve()))
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("ZOO_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  matplotlib.use("Agg")  # in case another test imported pyplot first
  import matplotlib.pyplot as plt

  namespace = {"__name__": "__main__"}
  try:
    for index, source in enumerate(sources):
      try:
        exec(compile(source, f"{path.name}, code cell {index}", "exec"), namespace)
      except Exception as error:
        raise AssertionError(f"{path.name}: code cell {index} failed: {error!r}") from error
  finally:
    plt.close("all")
