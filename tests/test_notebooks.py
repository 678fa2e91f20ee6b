"""The notebooks execute, top to bottom, on the records of the embedded default, show their figures inline
and write nothing into the folder they run in."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from varbench.harness.cli import default_study_path
from varbench.harness.run.config import load_study
from varbench.harness.run.study import run_study

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def default_records(tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("default_run")
    os.environ["VARBENCH_CACHE"] = str(out / "cache")
    small = ["quality.num_samples=8", "quality.block_size=4", "speed.repeats=1", "speed.batch_sizes=[2]",
             "quality.bootstrap=10"]
    run_study(load_study(default_study_path(), small), out)
    return out


ZOO_RECORDS = NOTEBOOKS.parent / "results" / "zoo_scaling"


def _run(name: str, records: Path, cwd: Path, monkeypatch) -> tuple[str, list[int]]:
    """Executes a notebook in `cwd`; returns its printed text and the indices of the code cells that show a PNG."""
    monkeypatch.setenv("VARBENCH_RECORDS", str(records))
    monkeypatch.setenv("VARBENCH_ZOO_RECORDS", str(ZOO_RECORDS))
    monkeypatch.delenv("VARBENCH_FIGURES", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # as a user's kernel: the notebook picks its own backend
    cwd.mkdir(exist_ok=True)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(o.get("text", "") for c in code for o in c.get("outputs", []))
    figures = [i for i, c in enumerate(code) if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    return text, figures


def test_scaling_notebook_fits_the_published_zoo_and_reads_our_records(default_records, tmp_path, monkeypatch):
    text, figures = _run("scaling.ipynb", default_records, tmp_path / "cwd", monkeypatch)
    assert "README zoo     FID vs parameters" in text and "paper Table 1  FID vs parameters" in text
    assert "var_zoo_d5 full" in text and "code_zoo_d5_d2 streaming" in text
    assert "zoo test loss vs parameters: alpha -" in text and "zoo FID vs parameters: alpha -" in text
    assert figures == [1, 2, 3]  # the published zoo's fit, the zoo's loss fit and its FID fit, inline
    out = Path(re.search(r"figures are written to (\S+)", text).group(1))
    for png in ("scaling_readme_d.png", "scaling_paper_d.png", "scaling_zoo_loss.png", "scaling_zoo_fid.png"):
        assert (out / png).stat().st_size > 1000
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing written where it runs (the repo, for a user)
    assert not out.is_relative_to(NOTEBOOKS.parent)


def test_frontier_notebook_plots_the_cells_of_a_run(default_records, tmp_path, monkeypatch):
    text, figures = _run("frontier.ipynb", default_records, tmp_path / "cwd", monkeypatch)
    assert "7 cells" in text and "Pareto front:" in text and "FID ↓" in text
    assert figures == [1]  # the frontier figure is in the executed notebook, not lost to a non-GUI backend
    assert "reference" in text  # the quality table names what each row was scored against
    out = Path(re.search(r"figures are written to (\S+)", text).group(1))
    assert (out / "frontier.png").stat().st_size > 1000 and not out.is_relative_to(NOTEBOOKS.parent)
    assert list((tmp_path / "cwd").iterdir()) == []
