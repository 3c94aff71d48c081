"""As a user would see it, in a real browser (Debian's Chromium, driven by Playwright):

* JupyterLab, started here on a free localhost port with a random token and its own
  settings, workspace, runtime and data folders, opens a notebook written with its smoke
  parameters and `interactive = True`, runs all cells (Run > Run All Cells), saves it, and
  the explorer's widgets render; moving the bits slider and then the eps slider (keyboard
  arrows on the slider handle, as a user would) changes the result text to name the new
  value, and redraws the figure. No cell may fail (read back from the saved notebook), no
  console error may appear.
* A smoke report's index.html, opened from a local file: every link leads to a page that
  loads, every image on those pages loads (naturalWidth > 0).
* The widget packages are installed as requirements.txt pins them, and those pins fit
  (ipywidgets' jupyterlab_widgets requirement; the JupyterLab widget manager is installed).
* Nothing goes to the network: every request whose host is not the machine itself is
  aborted and recorded, and the tests assert there were none.

Each test writes screenshots and the browser console into test-artifacts/browser/<test>/;
a failing test also gets a screenshot of the moment it failed, and the report shows the
console and the tail of JupyterLab's log (the hook is in tests/conftest.py).

Needs /usr/bin/chromium (`make setup` installs Debian's chromium with apt-get when run as
root) and the `playwright` package (requirements.txt); Playwright's own browser download
is not used. Without them the tests skip, except on CI (CI set), where they fail.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from nbsetup import CONFIG, NOTEBOOKS, ROOT, with_models

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("RQLAB_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
LOCAL_SCHEMES = {"file", "data", "blob", "about", "chrome-error"}
SERVER_START = 90       # seconds for JupyterLab to answer
RUN_ALL = 240           # seconds for Run All Cells to finish (smoke settings: ~10-30 s)
RECOMPUTE = 60          # seconds for the explorer to show a result (smoke settings: < 2 s)
NOTEBOOKS_IN_LAB = ["01_precision_transferability", "03_bit_selection"]
REPORT_NOTEBOOK = "03_bit_selection"


def _missing(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what}; on CI the browser tests must run (run `make setup` as root)")
    pytest.skip(what)


sync_api = None
try:
    from playwright import sync_api
except ImportError:  # pragma: no cover - depends on the environment
    pass


# ---- the browser -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if sync_api is None:
        _missing("the playwright package is not installed (requirements.txt; `make setup`)")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium with apt-get when run as root")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Tab:
    """A fresh browser context and page that records the console, page errors, and every
    request that would leave the machine (aborted)."""

    def __init__(self, browser, name: str, allow_hosts=()):
        self.name = name
        self.folder = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.iterdir():
            old.unlink()
        self.allow_hosts = set(allow_hosts)
        self.console: list[str] = []
        self.errors: list[str] = []
        self.remote: list[str] = []
        self.shots = 0
        self.server_log: Path | None = None
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda e: self._error(f"[pageerror] {e}"))
        self.page.on("websocket", lambda ws: self._check_url(ws.url))

    def is_local(self, url: str) -> bool:
        u = urlparse(url)
        if u.scheme in LOCAL_SCHEMES:
            return True
        return u.scheme in ("http", "https", "ws", "wss") and (u.hostname or "") in self.allow_hosts

    def _check_url(self, url: str) -> bool:
        if self.is_local(url):
            return True
        self.remote.append(url)
        return False

    def _route(self, route):
        if self._check_url(route.request.url):
            route.continue_()
        else:
            route.abort("blockedbyclient")

    def _on_console(self, msg):
        line = f"[{msg.type}] {msg.text}"
        self.console.append(line)
        if msg.type == "error":
            self.errors.append(line)

    def _error(self, line: str):
        self.console.append(line)
        self.errors.append(line)

    def shot(self, label: str) -> Path:
        self.shots += 1
        path = self.folder / f"{self.shots:02d}-{label}.png"
        self.page.screenshot(path=str(path))
        return path

    def save_console(self) -> Path:
        path = self.folder / "console.log"
        text = "\n".join(self.console)
        if self.remote:
            text += "\n\nblocked requests (would have left the machine):\n" + "\n".join(self.remote)
        path.write_text(text + "\n")
        return path

    def on_failure(self) -> str:
        """Called by tests/conftest.py when the test fails: a screenshot of that moment, the
        console log, and a text for the report."""
        parts = []
        try:
            parts.append(f"screenshot: {self.shot('failure')}")
        except Exception as e:  # the page may be gone
            parts.append(f"no screenshot: {e}")
        parts.append(f"console log: {self.save_console()}")
        parts.append("browser console (last 60 lines):\n" + ("\n".join(self.console[-60:]) or "(empty)"))
        if self.remote:
            parts.append("blocked requests:\n" + "\n".join(self.remote))
        if self.server_log and self.server_log.is_file():
            lines = self.server_log.read_text(errors="replace").splitlines()
            (self.folder / "jupyterlab.log").write_text("\n".join(lines) + "\n")
            parts.append("JupyterLab log (last 40 lines):\n" + "\n".join(lines[-40:]))
        return "\n".join(parts)

    def close(self):
        self.save_console()
        self.context.close()

    def assert_clean(self):
        assert not self.remote, f"requests that would have left the machine: {self.remote}"
        assert not self.errors, "errors in the browser console:\n" + "\n".join(self.errors)


def open_tab(request, browser, allow_hosts=()) -> Tab:
    tab = Tab(browser, request.node.name, allow_hosts)
    request.node.rqlab_tab = tab  # for the failure hook in conftest.py
    request.addfinalizer(tab.close)
    return tab


# ---- JupyterLab --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """JupyterLab serving `root`, with a random token, on a free port; every Jupyter folder
    (config, settings, workspaces, runtime, data) inside `home`."""

    def __init__(self, home: Path):
        self.home = home
        self.root = home / "root"
        self.runtime = home / "runtime"
        self.log = home / "jupyterlab.log"
        self.token = secrets.token_hex(16)
        self.port = free_port()
        dirs = {name: home / name for name in ("config", "settings", "workspaces", "data")}
        for d in (self.root, self.runtime, *dirs.values()):
            d.mkdir(parents=True, exist_ok=True)
        # no news, no update check in the page (the server side is off below as well)
        notification = dirs["settings"] / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notification.parent.mkdir(parents=True)
        notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        self.env = {**os.environ,
                    "JUPYTER_CONFIG_DIR": str(dirs["config"]), "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
                    "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]), "JUPYTER_RUNTIME_DIR": str(self.runtime),
                    "JUPYTER_DATA_DIR": str(dirs["data"]), "JUPYTER_PLATFORM_DIRS": "1",
                    "OMP_NUM_THREADS": "1",  # as in test_notebooks.py: the kernels share 2 cores
                    "MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONUNBUFFERED": "1"}
        self.proc = None

    def start(self):
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
               f"--port={self.port}", "--port-retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--ServerApp.terminals_enabled=False",
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + SERVER_START
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if self.api("GET", "api/status") is not None:
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise RuntimeError(f"JupyterLab did not answer within {SERVER_START} s:\n{self.log.read_text()[-3000:]}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def api(self, method: str, path: str):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else {}

    def shutdown_kernels(self):
        for s in self.api("GET", "api/sessions"):
            self.api("DELETE", f"api/sessions/{s['id']}")

    def kernel_pids(self) -> list[int]:
        """Processes whose command line names this server's runtime folder (its kernels)."""
        pids = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if str(self.runtime).encode() in (p / "cmdline").read_bytes():
                        pids.append(int(p.name))
                except OSError:
                    pass
        return pids

    def stop(self):
        if self.proc is None:
            return
        kernels = self.kernel_pids()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server shuts its kernels down
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in kernels + self.kernel_pids():  # any kernel the server left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def lab(browser, kernel, tmp_path_factory):
    server = Lab(tmp_path_factory.mktemp("jupyterlab"))
    try:
        yield server.start()
    finally:
        server.stop()


def write_notebook(stem: str, params: dict, folder: Path) -> Path:
    """The notebook with papermill's injected-parameters cell, not executed."""
    import papermill

    path = folder / f"{stem}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{stem}.ipynb"), str(path), parameters=params, prepare_only=True,
                               kernel_name="python3", language="python", progress_bar=False)
    return path


# JavaScript run in the page
ALL_CELLS_DONE = """() => {
  if (document.querySelector('.jp-Dialog')) return true;  // a question instead of a run: fail now
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt')]
      .map(e => e.innerText.trim());
  return prompts.length > 0 && !prompts.some(p => p.includes('*')) && prompts.some(p => /\\[\\d+\\]/.test(p));
}"""


def menu(page, top: str, command: str):
    page.locator("li.lm-MenuBar-item", has_text=top).click()
    page.locator(f"li.lm-Menu-item[data-command='{command}']").click()


def failed_cells(path: Path) -> tuple[list[str], list[int]]:
    """(error outputs as 'cell i: Name: value', indices of code cells that never ran) of
    the saved notebook."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    errors, not_run = [], []
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        if c.execution_count is None:
            not_run.append(i)
        for o in c.outputs:
            if o.output_type == "error":
                errors.append(f"cell {i}: {o.ename}: {o.evalue}")
    return errors, not_run


class Slider:
    """An ipywidgets slider (noUiSlider in JupyterLab 4) found by its description."""

    def __init__(self, explorer, name: str):
        self.box = explorer.locator(".widget-slider", has=explorer.page.locator(
            f"label.widget-label:text-is('{name}')"))
        self.handle = self.box.locator(".noUi-handle")
        self.readout = self.box.locator(".widget-readout")

    def value(self) -> str:
        return self.readout.inner_text().strip()

    def step(self) -> str:
        """One keyboard step right (left at the right end); returns the new readout."""
        now, top = (float(self.handle.get_attribute(a)) for a in ("aria-valuenow", "aria-valuemax"))
        before = self.value()
        self.handle.focus()
        self.handle.press("ArrowLeft" if now >= top else "ArrowRight")
        sync_api.expect(self.readout).not_to_have_text(before)
        return self.value()


# ---- the widget packages -------------------------------------------------------------------------

def pins() -> dict:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, sep, version = line.partition("#")[0].strip().partition("==")
        if sep:
            out[name.lower().replace("-", "_")] = version
    return out


def test_widget_packages_are_installed_as_pinned_and_match():
    """ipywidgets' frontend for JupyterLab is jupyterlab_widgets: the pins must be the
    versions installed and fit each other (the browser tests show the widgets render)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pinned = pins()
    for name in ("jupyterlab", "ipywidgets", "jupyterlab_widgets", "playwright"):
        assert metadata.version(name) == pinned[name], f"{name} is not the version requirements.txt pins"
    needs = {Requirement(r).name.lower().replace("-", "_"): Requirement(r) for r in metadata.requires("ipywidgets")}
    assert needs["jupyterlab_widgets"].specifier.contains(pinned["jupyterlab_widgets"]), needs["jupyterlab_widgets"]
    manager = Path(sys.prefix, "share", "jupyter", "labextensions", "@jupyter-widgets", "jupyterlab-manager")
    assert (manager / "package.json").is_file(), f"JupyterLab would not find the widget manager in {manager}"


# ---- the notebooks in JupyterLab -----------------------------------------------------------------

@pytest.mark.parametrize("stem", NOTEBOOKS_IN_LAB)
def test_notebook_sliders_change_the_result_in_jupyterlab(request, browser, lab, smoke, tiny, tmp_path, stem):
    params, _ = with_models(stem, {**smoke[stem], "interactive": True, "output_dir": str(tmp_path)}, tiny)
    path = write_notebook(stem, params, lab.root)
    tab = open_tab(request, browser, allow_hosts=LOCAL_HOSTS)
    tab.server_log = lab.log
    request.addfinalizer(lab.shutdown_kernels)
    page = tab.page

    # open it in its own workspace (nothing restored from another test) and run everything
    page.goto(lab.url(f"lab/workspaces/{stem}/tree/{path.name}"))
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.locator(".jp-Cell").first.wait_for()
    # the kernel is started and connected (before that, Run All asks which kernel to use)
    sync_api.expect(page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"Python 3.*\| Idle"))).to_have_count(
        1, timeout=SERVER_START * 1000)
    tab.shot("opened")
    menu(page, "Run", "runmenu:run-all")
    page.wait_for_function(ALL_CELLS_DONE, timeout=RUN_ALL * 1000, polling=500)
    dialog = page.locator(".jp-Dialog")
    assert not dialog.count(), f"JupyterLab asks instead of running: {dialog.inner_text()!r}"

    # the kernel: every code cell ran, none failed (the saved notebook)
    menu(page, "File", "docmanager:save")
    sync_api.expect(page.locator(".lm-TabBar-tab.jp-mod-current")).not_to_have_class(re.compile("jp-mod-dirty"))
    errors, not_run = failed_cells(path)
    assert not errors, f"cells failed in the kernel: {errors}"
    assert not not_run, f"code cells that did not run: {not_run}"

    # the widgets render
    explorer = page.locator(".widget-vbox", has=page.locator(".rqlab-explorer-result")).first
    result = explorer.locator(".rqlab-explorer-result .widget-html-content")
    figure = explorer.locator(".widget-output img")
    sync_api.expect(result).to_contain_text("robust accuracy at b=", timeout=RECOMPUTE * 1000)
    explorer.scroll_into_view_if_needed()
    sync_api.expect(figure).to_have_count(1)
    bits, eps = Slider(explorer, "bits"), Slider(explorer, "eps")
    assert f"b={bits.value()}, eps={eps.value()}:" in result.inner_text()
    tab.shot("widgets")

    # the bits slider, then the eps slider: the text names the new value, the figure is redrawn
    for name, slider, moved in (("bits", bits, "b"), ("eps", eps, "eps")):
        text, png = result.inner_text(), figure.get_attribute("src")
        new = slider.step()
        expected = f"b={bits.value()}, eps={eps.value()}:"
        sync_api.expect(result, f"the result does not follow the {name} slider").to_contain_text(
            expected, timeout=RECOMPUTE * 1000)
        now = result.inner_text()
        assert now != text and f"{moved}={new}" in now, (text, now)
        assert re.search(r"\d+\.\d%", now) and not now.startswith("cannot compute"), now
        sync_api.expect(figure).not_to_have_attribute("src", png)
        tab.shot(f"moved-{name}")

    assert not panel.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                             has_text="Traceback").count(), "a traceback is shown in the notebook"
    tab.assert_clean()


# ---- the HTML report, offline ------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_report(kernel, smoke, tiny, tmp_path_factory):
    """A smoke report of one notebook (its zoo model, or a stand-in), built by rqlab report."""
    import yaml

    from rqlab import report

    folder = tmp_path_factory.mktemp("report")
    cfg = yaml.safe_load(CONFIG.read_text())
    entry = next(r for r in cfg["runs"] if r["notebook"] == REPORT_NOTEBOOK)
    entry["params"], _ = with_models(REPORT_NOTEBOOK, entry.get("params", {}), tiny)
    cfg.update(notebooks_dir=str(NOTEBOOKS), runs=[entry])
    (folder / "smoke.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = folder / "out"
    summary = report.run_report(folder / "smoke.yaml", profile="smoke", out=out, progress=False)
    assert summary["n_failed"] == 0, summary["runs"]
    return out


IMAGES = """() => [...document.images].map(i => ({src: i.src.slice(0, 80), complete: i.complete,
                                              width: i.naturalWidth}))"""


def check_images(tab, minimum: int) -> int:
    tab.page.wait_for_load_state("load")
    images = tab.page.evaluate(IMAGES)
    broken = [i for i in images if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"images that did not load on {tab.page.url}: {broken}"
    assert len(images) >= minimum, f"{tab.page.url}: {len(images)} images, expected at least {minimum}"
    return len(images)


def test_report_renders_completely_offline(request, browser, smoke_report):
    tab = open_tab(request, browser)  # no host allowed: only file: and data: URLs
    page = tab.page
    index = (smoke_report / "index.html").as_uri()
    page.goto(index)
    check_images(tab, 1)  # the thumbnail
    sync_api.expect(page.locator("span.ok")).to_have_count(1)  # the run's status
    tab.shot("index")
    links = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
    kinds = {Path(urlparse(u).path).suffix for u in links}
    assert {".html", ".ipynb", ".json"} <= kinds, links

    for i, href in enumerate(links):
        assert urlparse(href).scheme == "file", href
        with page.expect_navigation():
            page.locator("a[href]").nth(i).click()
        assert page.url == href
        target = Path(urlparse(href).path)
        if target.suffix == ".html":
            check_images(tab, 1)  # the notebook's figures, embedded
            sync_api.expect(page.locator(".jp-Notebook")).to_have_count(1)
            tab.shot(f"link{i}-{target.stem}")
        else:  # shown as text by Chromium: it must be the whole file
            body = json.loads(page.locator("body").inner_text())
            assert ("cells" in body) if target.suffix == ".ipynb" else body["format"] == "rqlab-report"
        page.go_back()
        assert page.url == index
        check_images(tab, 1)
    tab.assert_clean()


def test_network_guard_records_and_blocks_remote_requests(request, browser):
    """The check above can fail: a page that loads a remote image is caught."""
    tab = open_tab(request, browser)
    tab.page.set_content('<img src="http://192.0.2.1/x.png"><img src="https://example.org/y.png">')
    tab.page.wait_for_load_state("load")
    assert sorted(tab.remote) == ["http://192.0.2.1/x.png", "https://example.org/y.png"]
    with pytest.raises(AssertionError, match="left the machine"):
        tab.assert_clean()
    tab.remote.clear()
    tab.errors.clear()  # the aborted loads log console errors
