"""Execute every notebook in notebooks/ (jupytext percent scripts) top to bottom, in a temporary working directory,
and check that it showed its figures and saved them as PNG beside its sweep, or beside the sweeps it plots (under
multirun/); and the helpers they run their sweeps with."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    nb = jupytext.read(path)
    nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    shown = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert shown, "the notebook displayed no figure"
    figures = sorted(tmp_path.glob("multirun/*/*/*.png"))  # a study's sweep folder, or a root of several sweeps
    assert figures, f"no PNG saved under {tmp_path / 'multirun'}: {sorted(p.name for p in tmp_path.rglob('*'))[:20]}"
    for png in figures:
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE), f"{png} is not a PNG"
        assert len(data) > 5_000, f"{png} is only {len(data)} bytes"
        sweeps = [png.parent, *(d for d in png.parent.iterdir() if d.is_dir())]
        assert any((d / "multirun.yaml").exists() for d in sweeps), f"{png} is not beside a sweep"


def test_run_sweep_raises_with_the_runs_error_and_notebook_root_finds_the_repository(tmp_path):
    from ollm_triton.results import notebook_root, run_sweep

    with pytest.raises(RuntimeError, match="no_such_plugin"):
        run_sweep(["+cache=no_such_plugin", "logger=none"], tmp_path / "sweep", cwd=tmp_path)
    repo = Path(__file__).resolve().parents[1]
    assert notebook_root(repo / "notebooks") == repo and notebook_root(tmp_path) == tmp_path.resolve()
