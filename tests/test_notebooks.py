"""The notebooks execute, top to bottom, on the records of the embedded default."""

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


def _run(name: str, records: Path, tmp_path: Path, monkeypatch) -> str:
    monkeypatch.setenv("VARBENCH_RECORDS", str(records))
    monkeypatch.setenv("VARBENCH_ZOO_RECORDS", str(ZOO_RECORDS))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_scaling_notebook_fits_the_published_zoo_and_reads_our_records(default_records, tmp_path, monkeypatch):
    text = _run("scaling.ipynb", default_records, tmp_path, monkeypatch)
    assert "README zoo     FID vs parameters" in text and "paper Table 1  FID vs parameters" in text
    assert "var_zoo_d5 full" in text and "code_zoo_d5_d2 streaming" in text
    assert "zoo test loss vs parameters: alpha -" in text and "zoo FID vs parameters: alpha -" in text
    for png in ("scaling_readme_d.png", "scaling_zoo_loss.png", "scaling_zoo_fid.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_frontier_notebook_plots_the_cells_of_a_run(default_records, tmp_path, monkeypatch):
    text = _run("frontier.ipynb", default_records, tmp_path, monkeypatch)
    assert "7 cells" in text and "Pareto front:" in text and "FID ↓" in text
