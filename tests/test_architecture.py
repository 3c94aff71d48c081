"""The layout is a contract: import-linter's layers (pyproject.toml) hold, an injected
upward import breaks them, and the library imports none of the extras' packages."""
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from rqlab.extras import require

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: `make setup` installs import-linter from requirements.txt")
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"},
                          timeout=300)


def test_the_layer_contract_holds():
    res = lint(ROOT, ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("module, upward", [("quant/__init__.py", "rqlab.cli"),
                                            ("attacks/pgd.py", "rqlab.defenses"),
                                            ("validate.py", "rqlab.data")])
def test_an_injected_upward_import_breaks_the_contract(tmp_path, module, upward):
    shutil.copytree(ROOT / "rqlab", tmp_path / "rqlab", ignore=shutil.ignore_patterns("store", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint(tmp_path, tmp_path).returncode == 0  # the copy is as good as the original
    with open(tmp_path / "rqlab" / module, "a") as f:
        f.write(f"\nimport {upward}  # injected\n")
    res = lint(tmp_path, tmp_path)
    layer = "rqlab." + module.split("/")[0].removesuffix(".py")
    assert res.returncode != 0 and f"{layer} is not allowed to import {upward}" in res.stdout, res.stdout[-2000:]


def test_the_library_imports_no_extra():
    """`pip install rqlab` (torch, torchvision, numpy, tqdm) is enough for the library:
    training, evaluation, attacks (bar AutoAttack), the zoo and the CLI's parser."""
    code = textwrap.dedent("""
        import sys
        import rqlab, rqlab.experiment, rqlab.evaluation, rqlab.attacks, rqlab.zoo, rqlab.defenses
        import rqlab.bitselect, rqlab.analysis, rqlab.cli
        rqlab.cli.build_parser()
        extras = ["papermill", "nbconvert", "nbformat", "yaml", "matplotlib", "seaborn", "ipywidgets",
                  "pyautoattack", "jupyterlab"]
        print(",".join(m for m in extras if m in sys.modules))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "", f"the core library imported extras: {res.stdout.strip()}"


def test_extras_are_declared_and_a_missing_one_is_named():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"notebooks", "report", "autoattack", "test"} <= set(extras)
    assert "papermill" in extras["report"] and "pyautoattack" in extras["autoattack"]
    with pytest.raises(ImportError, match=r"pip install 'rqlab\[report\]'"):
        require("no_such_module_for_rqlab", "report")
    assert require("json", "report").dumps([]) == "[]"
