"""The notebooks under notebooks/ run from top to bottom, smoke-sized.

Each notebook is executed in a fresh Jupyter kernel with
``KRONJAX_NOTEBOOK_QUICK=1`` (its parameters cell then picks small sizes), on a
temporary copy so that the committed notebooks and their saved outputs stay as
they are. A cell that raises fails the test (nbclient's CellExecutionError, with
the cell and its traceback); each notebook must also draw at least one plot.
"""

import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted(
    (pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _images(nb) -> int:
  return sum("image/png" in output.get("data", {})
             for cell in nb.cells if cell.cell_type == "code"
             for output in cell.get("outputs", []))


def test_the_notebooks_are_there():
  assert [p.name for p in NOTEBOOKS] == [
      "01_quickstart.ipynb", "02_nnx_and_optax_chains.ipynb",
      "03_kronecker_algebra.ipynb", "04_curvature_quality.ipynb",
      "05_influence_and_laplace.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:  # the saved outputs must not count as this run's
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  # The kernel inherits this process's environment when it starts. The test
  # process's float64 (conftest.py) is not inherited: notebooks run in float32.
  monkeypatch.setenv("KRONJAX_NOTEBOOK_QUICK", "1")
  # One thread for the LAPACK behind jnp.linalg's eigh, svd and solve: with
  # more threads than free cores (two notebooks at once under pytest -n 2) its
  # threads spin against each other, and a 100×400 SVD takes seconds, not ms.
  for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    monkeypatch.setenv(name, "1")
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  nbformat.write(nb, tmp_path / path.name)
  assert _images(nb) >= 1, f"{path.name} drew no plot"
