"""Notebooks: every notebooks/*.ipynb runs from top to bottom on its tiny settings.

The code cells run in order in one namespace (no Jupyter kernel needed), with ZOO_NOTEBOOK_TINY=1,
which each notebook reads to pick small models and inputs, and matplotlib's non-interactive Agg
backend. Lines starting with '!' or '%' (Colab shell commands and magics, e.g. a pip install) are
left out: the test environment already has what they would install. A notebook checks its own
results with asserts.
"""
import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def code_cells(path: Path) -> list[str]:
  notebook = json.loads(path.read_text())
  cells = []
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      source = "".join(cell["source"])
      cells.append("\n".join(line for line in source.splitlines()
                             if not line.lstrip().startswith(("!", "%"))))
  return cells


def test_notebooks_are_found_and_honour_the_tiny_switch():
  assert NOTEBOOKS, "no notebooks/*.ipynb found"
  for path in NOTEBOOKS:
    # Without the switch CI would run the full-size model.
    assert any("ZOO_NOTEBOOK_TINY" in cell for cell in code_cells(path)), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_tiny_settings(path, monkeypatch):
  monkeypatch.setenv("ZOO_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  matplotlib.use("Agg")  # in case another test imported pyplot first
  import matplotlib.pyplot as plt

  namespace = {"__name__": "__main__"}
  try:
    for index, source in enumerate(code_cells(path)):
      try:
        exec(compile(source, f"{path.name}, code cell {index}", "exec"), namespace)
      except Exception as error:
        raise AssertionError(f"{path.name}: code cell {index} failed: {error!r}") from error
  finally:
    plt.close("all")
