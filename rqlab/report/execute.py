"""Execution of one notebook: papermill run, HTML export, main figure and key numbers.

Notebook contract
    * a cell tagged `parameters` that declares every name the config sets, `output_dir`
      included (and `interactive` if it has widgets: the report passes False);
    * key numbers written as JSON into output_dir (`results.json`; other *.json files are
      read too, their keys prefixed with the file's stem); scalars are flattened
      (nested keys joined by "."), short lists of scalars kept, the rest ignored;
    * the main figure is the first PNG output (inline matplotlib), or the first PNG of a
      cell tagged `main-figure`.
    Notebooks run with the `python3` kernel, which must be this interpreter (checked),
    in notebooks_dir as the working directory.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..extras import require
from ..checkpoint import atomic_write_bytes, file_mode, temp_prefix
from ..validate import RqlabError

KERNEL = "python3"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# The lab template loads require.js, MathJax, mermaid and the widget manager from CDNs;
# none is needed for text, tables and PNG figures, and the HTML must work offline.
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def check_kernel() -> None:
    """The `python3` kernel must run this interpreter (so notebooks import this rqlab).

    jupyter_client replaces a bare `python` in a kernelspec by sys.executable; an absolute
    path elsewhere (e.g. a kernelspec left in ~/.local/share/jupyter) means another Python.
    """
    kernelspec = require("jupyter_client.kernelspec", "report")
    KernelSpecManager, NoSuchKernel = kernelspec.KernelSpecManager, kernelspec.NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel as e:
        raise RqlabError(f"no Jupyter kernel {KERNEL!r}: run `{sys.executable} -m ipykernel install "
                         "--sys-prefix`") from e
    exe = spec.argv[0] if spec.argv else ""
    if exe in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        return
    if Path(exe).parent.resolve() != Path(sys.executable).parent.resolve():
        raise RqlabError(f"kernel {KERNEL!r} ({spec.resource_dir}/kernel.json) runs {exe}, not this Python "
                         f"({sys.executable}), so the notebooks would not use this rqlab: remove that "
                         f"kernelspec folder, or make its argv start with \"python\" or {sys.executable}")


@contextmanager
def _inline_matplotlib():
    """Kernels inherit the environment: an MPLBACKEND such as Agg would keep figures out of
    the outputs (no PNG, no thumbnail). Force the inline backend while the kernel starts."""
    old = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = old


def execute_notebook(source: str, output: str, params: dict, cwd: str, cell_progress: bool = False) -> dict:
    """Run `source` with papermill into `output` (via a temp file in the same folder).

    Returns {"error": None or "Name: message", "traceback": str or None, "seconds": float}.
    The executed notebook is kept when a cell fails (papermill saves it with the error).
    Runs in worker processes too, so it takes and returns plain values.
    """
    papermill = require("papermill", "report")

    out = Path(output)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(out.stem), suffix=".ipynb", dir=out.parent)
    os.close(fd)
    t0 = time.perf_counter()
    error = trace = None
    try:
        with _inline_matplotlib():
            papermill.execute_notebook(
                source, tmp, parameters=params, kernel_name=KERNEL, language="python", progress_bar=cell_progress,
                cwd=cwd,
                extra_arguments=["--IPKernelApp.log_level=CRITICAL"])  # no "TCP without encryption" noise, no
                # kernel-side traceback when the report is killed mid-cell (cell errors come as messages)
    except papermill.PapermillExecutionError as e:
        error = f"{e.ename}: {_ANSI.sub('', str(e.evalue))} (cell In [{e.exec_count}])"
        trace = _ANSI.sub("", "\n".join(e.traceback))
    except Exception as e:  # kernel died, timeout, bad notebook...: keep going with the other runs
        lines = _ANSI.sub("", str(e)).strip().splitlines()
        error = f"{type(e).__name__}: {lines[0] if lines else ''}"
        trace = "\n".join(lines)
    finally:
        if os.path.exists(tmp) and os.path.getsize(tmp) > 0:  # papermill wrote it (also when a cell failed)
            os.chmod(tmp, file_mode())
            os.replace(tmp, out)
        elif os.path.exists(tmp):
            os.unlink(tmp)
    return {"error": error, "traceback": trace, "seconds": time.perf_counter() - t0}


def export_html(ipynb, html_path, show_input: bool = False) -> Path:
    """Write the executed notebook as self-contained HTML (figures inline, no CDN scripts)."""
    import jinja2
    nbformat = require("nbformat", "report")
    HTMLExporter = require("nbconvert", "report").HTMLExporter

    log = logging.getLogger("rqlab.report.nbconvert")
    log.setLevel(logging.ERROR)  # not "Alternative text is missing" for every matplotlib figure
    exporter = HTMLExporter(
        log=log, template_name="lab", template_file="rqlab_offline.html.j2",
        extra_loaders=[jinja2.DictLoader({"rqlab_offline.html.j2": _OFFLINE_TEMPLATE})],
        embed_images=True, exclude_input=not show_input)
    body, _ = exporter.from_notebook_node(nbformat.read(ipynb, as_version=4))
    return atomic_write_bytes(html_path, body.encode())


def main_figure(nb) -> bytes | None:
    """PNG bytes of the notebook's main figure: the first PNG output of a cell tagged
    `main-figure`, else the first PNG output; None if there is none."""
    def pngs(cells):
        for cell in cells:
            for out in cell.get("outputs", []):
                data = out.get("data", {}).get("image/png")
                if data:
                    yield base64.b64decode(data if isinstance(data, str) else "".join(data))

    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "main-figure" in c.get("metadata", {}).get("tags", [])]
    return next(pngs(tagged), None) or next(pngs(code), None)


def read_results(run_dir) -> tuple[dict, list[str], list[str]]:
    """Flattened key numbers from the *.json files in run_dir (results.json first).

    Returns (numbers, file names, warnings). Keys of files other than results.json are
    prefixed with the file's stem.
    """
    numbers, files, warnings = {}, [], []
    paths = sorted(Path(run_dir).glob("*.json"), key=lambda p: (p.name != "results.json", p.name))
    for path in paths:
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            warnings.append(f"{path.name} unreadable: {e}")
            continue
        files.append(path.name)
        _flatten(obj, "" if path.name == "results.json" else path.stem, numbers)
    return numbers, files, warnings


def _flatten(obj, prefix: str, out: dict, max_list: int = 8) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, max_list)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        out[prefix or "value"] = obj
    elif isinstance(obj, list) and len(obj) <= max_list and all(
            v is None or isinstance(v, (bool, int, float, str)) for v in obj):
        out[prefix or "value"] = obj

