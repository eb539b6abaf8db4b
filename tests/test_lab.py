"""The notebooks as users meet them: JupyterLab, started like ``make lab``, in headless Chromium.

A real Jupyter server (``python -m dmlkit.lab``) on a free loopback port with a token serves
copies of the notebooks laid out as in the repository; Chromium opens one, and the test
clicks Run → Run All Cells in JupyterLab's menu, so the cells are executed by the browser's
JupyterLab frontend, not by papermill. Then it saves the notebook with Ctrl+S and checks,
in the page and in the saved file: the kernel is ``dmlkit``, every code cell ran, no cell
shows an error, the figures are ``<img>`` elements the browser decoded (non-zero natural
size), and the tqdm bars drew in the page. A screenshot of each executed notebook goes to
``test-artifacts/lab/`` (``$DMLKIT_TEST_ARTIFACTS`` to change it).

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser-deps``) and the
``selenium`` package (the dev extra); the browser cases are skipped, with the reason, where
they are missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import nbformat
import pytest

from dmlkit.lab import lab_arguments
from dmlkit.plotting.explore import MAX_GRID

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("DMLKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("DMLKIT_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS = Path(os.environ.get("DMLKIT_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "lab"
# As root in a closed network Chromium needs no sandbox, and must not phone home (its
# background connections are refused here and it would wait on them).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1800",
)

MISSING_BROWSER = (
    None
    if CHROMIUM.is_file() and CHROMEDRIVER.is_file()
    else f"headless Chromium not installed ({CHROMIUM}, {CHROMEDRIVER}): run `make browser-deps` "
    "(apt-get install chromium chromium-driver), or set DMLKIT_CHROMIUM/DMLKIT_CHROMEDRIVER"
)
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # the dev extra is not installed
    webdriver = None


class Lab(NamedTuple):
    url: str  # http://127.0.0.1:<port>
    token: str
    root: Path  # the server's root folder: a stand-in for the repository
    driver: webdriver.Chrome


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(lab_url: str, token: str, path: str, method: str = "GET") -> object:
    request = urllib.request.Request(
        f"{lab_url}/api/{path}", method=method, headers={"Authorization": f"token {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server as ``make lab`` starts it, and a headless Chromium."""
    if MISSING_BROWSER:
        pytest.skip(MISSING_BROWSER)
    if webdriver is None:
        pytest.skip("selenium is not installed: `make setup` (the dev extra)")
    base = tmp_path_factory.mktemp("lab")
    root, home = base / "root", base / "jupyter"
    (root / "notebooks").mkdir(parents=True)
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No "get notified about Jupyter news?" toast over the screenshots.
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {
        **os.environ,
        # The user's own Jupyter config, workspaces and settings stay out of the test.
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
    }
    port, token = _free_port(), os.urandom(16).hex()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "dmlkit.lab",
        "--no-browser",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    with open(base / "server.log", "wb") as log:
        server = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait_for_server(server, url, token, base / "server.log")
            with _chromium(base / "chromium-profile", base / "chromedriver.log") as driver:
                yield Lab(url, token, root, driver)
        finally:
            try:
                _api(url, token, "shutdown", method="POST")  # stops its kernels too
                server.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                server.kill()
                server.wait()


def _wait_for_server(server: subprocess.Popen, url: str, token: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            _api(url, token, "status")
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Jupyter server did not start:\n{_tail(log)}")
            time.sleep(0.5)


@contextlib.contextmanager
def _chromium(profile: Path, log: Path) -> Iterator[webdriver.Chrome]:
    """Debian's headless Chromium through its chromedriver, with a fresh empty profile."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path: no Selenium Manager
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(
        options=options, service=Service(str(CHROMEDRIVER), log_output=str(log))
    )
    try:
        yield driver
    finally:
        driver.quit()


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _copy_notebook(lab: Lab, name: str, *, smoke: bool = True) -> Path:
    """``notebooks/<name>`` copied into the server's root, its parameters cell set to smoke."""
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    parameters.source, count = re.subn(
        r"^smoke: bool = False", f"smoke: bool = {smoke}", parameters.source, flags=re.M
    )
    assert count == 1, f"{name}: no `smoke: bool = False` line in the parameters cell"
    path = lab.root / "notebooks" / name
    nbformat.write(notebook, path)
    return path


# Every stderr stream output the page shows while the cells run, as it is rendered (after
# JupyterLab applies the carriage returns tqdm draws with): transient bars are caught too.
_WATCH_STREAMS = """
window.dmlkitStreams = [];
new MutationObserver(() => {
  for (const e of document.querySelectorAll(
      '.jp-NotebookPanel:not(.lm-mod-hidden) [data-mime-type="application/vnd.jupyter.stderr"]')) {
    const text = e.textContent;
    if (window.dmlkitStreams.length < 5000 && !window.dmlkitStreams.includes(text)) {
      window.dmlkitStreams.push(text);
    }
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""

# The current notebook as the page shows it: kernel, run state and each cell's outputs.
_PAGE_STATE = """
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
if (!panel) return null;
const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
const kernel = panel.querySelector('.jp-Toolbar-kernelName');
return {
  kernel: kernel ? kernel.textContent.trim() : null,
  status: indicator ? indicator.dataset.status : null,
  dirty: !!document.querySelector('.lm-TabBar-tab.lm-mod-current.jp-mod-dirty'),
  dialog: !!document.querySelector('.jp-Dialog'),
  cells: Array.from(panel.querySelectorAll('.jp-Notebook .jp-Cell')).map(cell => ({
    code: cell.classList.contains('jp-CodeCell'),
    prompt: (cell.querySelector('.jp-InputPrompt') || {}).textContent || '',
    text: Array.from(cell.querySelectorAll('.jp-OutputArea-output')).map(o => o.textContent),
    images: Array.from(cell.querySelectorAll('.jp-OutputArea-output img')).map(
      img => [img.complete, img.naturalWidth, img.naturalHeight]),
  })),
};
"""


def _wait(lab: Lab, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = lab.driver.execute_script(_PAGE_STATE)
        if state is not None and predicate(state):
            return state
        if time.monotonic() > deadline:
            _screenshot(lab, f"timeout-{int(time.time())}")
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; page: {state}")
        time.sleep(0.5)


def _click_menu(lab: Lab, menu: str, item: str) -> None:
    driver = lab.driver
    driver.find_element(
        By.XPATH, f"//div[contains(@class,'lm-MenuBar-itemLabel') and text()='{menu}']"
    ).click()
    driver.find_element(
        By.XPATH, f"//div[contains(@class,'lm-Menu-itemLabel') and text()='{item}']"
    ).click()


def _screenshot(lab: Lab, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    lab.driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def _finished(state: dict) -> bool:
    prompts = [cell["prompt"] for cell in state["cells"]]
    return (
        state["status"] == "idle"
        and any(re.fullmatch(r"\[\d+\]:", prompt) for prompt in prompts)
        and not any("*" in prompt for prompt in prompts)
    )


def run_in_lab(lab: Lab, path: Path, *, timeout: float = 600) -> tuple[dict, nbformat.NotebookNode]:
    """Open ``path`` in JupyterLab, Run All Cells, save; the page's final state, the saved file."""
    relative = path.relative_to(lab.root).as_posix()
    # ?reset: a fresh workspace, so that only this notebook is open.
    lab.driver.get(f"{lab.url}/lab/tree/{relative}?reset&token={lab.token}")
    _wait(lab, lambda s: s["status"] == "idle" and s["kernel"] != "No Kernel", 180, "the kernel")
    lab.driver.execute_script(_WATCH_STREAMS)
    _click_menu(lab, "Run", "Run All Cells")
    # Done: the kernel is idle, a cell has run and none is queued ([*]) — twice in a row,
    # since the queue can look empty for an instant between two cells.
    deadline = time.monotonic() + timeout
    for _ in range(2):
        _wait(lab, _finished, max(deadline - time.monotonic(), 1), f"{relative} to finish")
        time.sleep(0.5)
    before = path.stat().st_mtime_ns
    # Focus the notebook through its tab (a click inside could land on a link), then save.
    lab.driver.find_element(By.CSS_SELECTOR, ".lm-TabBar-tab.lm-mod-current").click()
    webdriver.ActionChains(lab.driver).key_down(Keys.CONTROL).send_keys("s").key_up(
        Keys.CONTROL
    ).perform()
    state = _wait(
        lab,
        lambda s: not s["dirty"] and path.stat().st_mtime_ns != before,
        60,
        f"{relative} to be saved",
    )
    state["streams"] = lab.driver.execute_script("return window.dmlkitStreams")
    return state, nbformat.read(path, as_version=4)


def errors_shown(state: dict, saved: nbformat.NotebookNode) -> list[str]:
    """Every error a cell shows: in the saved outputs and as a traceback in the page."""
    found = [
        f"cell {i}: {output.ename}: {output.evalue}"
        for i, cell in enumerate(saved.cells)
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    found += [
        f"cell {i} (page): {text[:200]}"
        for i, cell in enumerate(state["cells"])
        for text in cell["text"]
        if "Traceback (most recent call last)" in text
    ]
    return found


def assert_ran_cleanly(state: dict, saved: nbformat.NotebookNode) -> None:
    assert state["kernel"] == "Python (dmlkit)" and not state["dialog"]
    assert saved.metadata.kernelspec.name == "dmlkit"
    assert errors_shown(state, saved) == []
    assert len(state["cells"]) == len(saved.cells)
    for i, (shown, cell) in enumerate(zip(state["cells"], saved.cells, strict=True)):
        if cell.cell_type == "code":
            assert cell.execution_count is not None, f"cell {i} did not run"
            assert re.fullmatch(r"\[\d+\]:", shown["prompt"]), (i, shown["prompt"])


def images_of(state: dict, saved: nbformat.NotebookNode, call: str) -> list[list]:
    """[complete, naturalWidth, naturalHeight] of the images of the cell whose code has ``call``."""
    index = next(i for i, c in enumerate(saved.cells) if c.cell_type == "code" and call in c.source)
    return state["cells"][index]["images"]


def _scroll_to_cell(lab: Lab, saved: nbformat.NotebookNode, call: str) -> None:
    index = next(i for i, c in enumerate(saved.cells) if c.cell_type == "code" and call in c.source)
    lab.driver.execute_script(
        "document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell')"
        f"[{index}].scrollIntoView({{block: 'start'}});"
    )
    time.sleep(1)  # let the browser paint the cells now in view


def _decoded(images: list[list]) -> bool:
    return bool(images) and all(done and width > 0 and height > 0 for done, width, height in images)


def test_make_lab_defaults_give_way_to_the_command_line():
    defaults = lab_arguments([])
    assert "--ServerApp.ip=127.0.0.1" in defaults
    assert "--MappingKernelManager.default_kernel_name=dmlkit" in defaults
    mine = lab_arguments(["--ip=0.0.0.0", "--port", "8890"])
    assert not any("127.0.0.1" in arg for arg in mine)  # Jupyter refuses a setting given twice
    assert mine[-3:] == ["--ip=0.0.0.0", "--port", "8890"]


def test_losses_2d_runs_in_jupyterlab_and_a_raising_cell_is_caught(lab):
    """The quick case, one server for both parts (xdist could give two tests two servers)."""
    path = _copy_notebook(lab, "losses_2d.ipynb")
    state, saved = run_in_lab(lab, path, timeout=180)
    _scroll_to_cell(lab, saved, "plot_toy_runs")
    _screenshot(lab, "losses_2d")
    assert_ran_cleanly(state, saved)
    assert _decoded(images_of(state, saved, "plot_toy_runs"))
    # The kernel ran in the server's root, as papermill does: figures_dir="figures" is there.
    assert (lab.root / "figures" / "losses_2d.png").is_file()
    assert not (lab.root / "notebooks" / "figures").exists()

    # The checks can fail: a notebook whose cell raises shows (and saves) its error.
    notebook = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("x = 1"),
            nbformat.v4.new_code_cell("raise ValueError('broken on purpose')"),
            nbformat.v4.new_code_cell("y = 2"),
        ],
        metadata={"kernelspec": {"name": "dmlkit", "display_name": "Python (dmlkit)"}},
    )
    path = lab.root / "notebooks" / "broken.ipynb"
    nbformat.write(notebook, path)
    state, saved = run_in_lab(lab, path, timeout=120)
    errors = errors_shown(state, saved)
    assert any("ValueError: broken on purpose" in e for e in errors), errors
    assert any("(page)" in e for e in errors), "the traceback is visible in the page"
    assert saved.cells[2].execution_count is None  # Run All stops at the error
    with pytest.raises(AssertionError):
        assert_ran_cleanly(state, saved)


@pytest.mark.slow
def test_train_eval_then_tsne_run_in_jupyterlab(lab):
    """A user's first two notebooks: train (smoke), then the t-SNE maps of that run."""
    path = _copy_notebook(lab, "train_eval.ipynb")
    state, saved = run_in_lab(lab, path)
    _scroll_to_cell(lab, saved, "learning_curves")
    _screenshot(lab, "train_eval")
    assert_ran_cleanly(state, saved)
    assert _decoded(images_of(state, saved, "learning_curves"))
    assert _decoded(images_of(state, saved, "density_plot"))
    # The tqdm bars drew in the page: the epoch bar while it ran (it clears itself when the
    # epoch ends), and the embedding bar, kept, as one line at 100 %.
    streams = "\n".join(state["streams"])
    assert re.search(r"epoch 1/1: +\d+%\|.*\| *\d+/\d+ \[.*img/s", streams), state["streams"]
    final = "\n".join(text for cell in state["cells"] for text in cell["text"])
    assert re.search(r"embed: 100%\|█+\| (\d+)/\1 ", final), final[-2000:]
    assert final.count("embed:") == final.count("embed: 100%"), "a bar is drawn once, not per step"
    # The run folder is where tsne.ipynb's default run_dir looks: the repository's root.
    assert (lab.root / "papermill_runs" / "interactive" / "train_eval" / "metrics.json").is_file()

    path = _copy_notebook(lab, "tsne.ipynb")
    state, saved = run_in_lab(lab, path)
    _scroll_to_cell(lab, saved, "scatter_by_class")
    _screenshot(lab, "tsne")
    assert_ran_cleanly(state, saved)
    for call in ("scatter_by_class", "thumbnail_map", "scatter_by_mode"):
        assert _decoded(images_of(state, saved, call)), call
    assert len(list((lab.root / "figures").glob("interactive_train_eval_tsne*.png"))) == 3


# The screen position of point ``i`` of the explorer's map (the last Bokeh document on the
# page), from BokehJS's own view of the plot: its canvas box and its data → pixel scales.
_BOKEH_POINT = """
const docs = Bokeh.documents;
const plot = docs.length ? docs[docs.length - 1].get_model_by_name('map') : null;
const view = plot ? Bokeh.index.find_one(plot) : null;
if (!view || !view.frame || !view.canvas_view) return null;
const data = plot.renderers[0].data_source.data;
const box = view.canvas_view.el.getBoundingClientRect();
const i = arguments[0];
return [box.left + view.frame.x_scale.compute(data.x[i]),
        box.top + view.frame.y_scale.compute(data.y[i])];
"""
# [complete, naturalWidth, naturalHeight] of the visible images matching a CSS selector,
# looked for inside Bokeh's shadow roots too (its tooltips and Divs live there).
_DEEP_IMAGES = """
const found = [];
const walk = (root) => {
  root.querySelectorAll(arguments[0]).forEach(e => found.push(e));
  root.querySelectorAll('*').forEach(e => { if (e.shadowRoot) walk(e.shadowRoot); });
};
walk(document);
return found.filter(e => e.getBoundingClientRect().width > 0)
  .map(e => [e.complete, e.naturalWidth, e.naturalHeight]);
"""


# Colour by first-neighbour correctness (the selector above the map): the dots' colours.
_RECOLOUR = """
Bokeh.documents[0].get_model_by_name('colour').value = 'first neighbour';
"""
_COLOURS = """
const colors = Bokeh.documents[0].get_model_by_name('map').renderers[0].data_source.data.color;
return [...new Set(colors)].sort();
"""


# The box-select tool made the active drag (as a click on its toolbar button does), and the
# map's frame in page coordinates.
_BOX_SELECT = """
const plot = Bokeh.documents[0].get_model_by_name('map');
plot.toolbar.active_drag = plot.toolbar.tools.find(tool => tool.type === 'BoxSelectTool');
const view = Bokeh.index.find_one(plot);
const box = view.canvas_view.el.getBoundingClientRect();
const frame = view.frame.bbox;
return [box.left + frame.left, box.top + frame.top, box.left + frame.right, box.top + frame.bottom];
"""


def box_select_everything(driver) -> None:
    """Drag the box-select tool over the whole map."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    left, top, right, bottom = driver.execute_script(_BOX_SELECT)
    action = ActionBuilder(driver)
    action.pointer_action.move_to_location(round(left + 2), round(top + 2)).pointer_down()
    action.pointer_action.move_to_location(round(right - 2), round(bottom - 2)).pointer_up()
    action.perform()
    time.sleep(1)


def hover_and_click(driver, index: int = 0, frame=None) -> tuple[list, list]:
    """Hover point ``index`` of the explorer (its tooltip's images), then click it (the
    gallery's images: the query and its top-k). ``frame``: the iframe that holds the page
    (the pointer moves in the top page's coordinates, the page is read inside the frame)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    def inside(script: str, *args):
        if frame is not None:
            driver.switch_to.frame(frame)
        try:
            return driver.execute_script(script, *args)
        finally:
            if frame is not None:
                driver.switch_to.default_content()

    deadline = time.monotonic() + 60
    while (point := inside(_BOKEH_POINT, index)) is None:
        assert time.monotonic() < deadline, "the explorer's map did not draw"
        time.sleep(0.5)
    if frame is not None:
        box = driver.execute_script("return arguments[0].getBoundingClientRect()", frame)
        point = [point[0] + box["left"], point[1] + box["top"]]
    x, y = round(point[0]), round(point[1])
    action = ActionBuilder(driver)
    action.pointer_action.move_to_location(x, y)
    action.perform()
    time.sleep(1)
    tooltip = inside(_DEEP_IMAGES, ".dmlkit-tooltip img")
    action = ActionBuilder(driver)
    action.pointer_action.move_to_location(x, y).click()
    action.perform()
    time.sleep(1)
    return tooltip, inside(_DEEP_IMAGES, ".dmlkit-gallery img")


def hover_and_click_in_notebook(lab: Lab, saved: nbformat.NotebookNode) -> tuple[list, list]:
    """``hover_and_click`` in the explorer that the notebook shows (in an iframe)."""
    _scroll_to_cell(lab, saved, "show_explorer")
    frame = lab.driver.find_element(By.CSS_SELECTOR, "iframe.dmlkit-explorer")
    return hover_and_click(lab.driver, frame=frame)


@pytest.mark.slow
def test_explore_runs_in_jupyterlab_hover_and_click_and_its_page_draws_offline(lab):
    """explore.ipynb on a (smoke) run: hover a point, see its image; click it, see the
    query and its top-k; then its standalone page, opened with the network off."""
    import papermill as pm

    run_dir = lab.root / "papermill_runs" / "interactive" / "train_eval"
    pm.execute_notebook(
        str(ROOT / "notebooks" / "train_eval.ipynb"),
        str(lab.root / "train_eval.ipynb"),
        # overwrite: the lab test before this one may have left its run in that folder
        parameters={"smoke": True, "progress": False, "out_dir": str(run_dir), "overwrite": True},
        kernel_name="dmlkit",
        cwd=str(lab.root),
        progress_bar=False,
    )
    path = _copy_notebook(lab, "explore.ipynb")
    state, saved = run_in_lab(lab, path)
    assert_ran_cleanly(state, saved)
    for call in ("retrieval_gallery", "confused_pairs_figure"):
        assert _decoded(images_of(state, saved, call)), call
    tooltip, gallery = hover_and_click_in_notebook(lab, saved)
    _screenshot(lab, "explore")
    assert _decoded(tooltip), tooltip  # one image per point under the pointer
    k = int(re.search(r"^num_neighbours: int = (\d+)", saved.cells[2].source, re.M)[1])
    assert _decoded(gallery) and len(gallery) == k + 1, gallery

    # A sweep's papermill copy of the notebook (the sweep worker runs and signs it), opened
    # later and not run: the view draws.
    from dmlkit.sweep import worker

    executed = run_dir / "explore.ipynb"
    job = {"notebook": str(ROOT / "notebooks" / "explore.ipynb"), "output": str(executed),
           "parameters": {"smoke": True, "run_dir": str(run_dir)}, "kernel": "dmlkit",
           "cwd": str(lab.root)}  # fmt: skip
    assert worker.execute(job)["status"] == "ok"
    lab.driver.get(
        f"{lab.url}/lab/tree/{executed.relative_to(lab.root).as_posix()}?reset&token={lab.token}"
    )
    _wait(lab, lambda s: s["status"] == "idle" and s["kernel"] != "No Kernel", 180, "the kernel")
    saved = nbformat.read(executed, as_version=4)
    tooltip, gallery = hover_and_click_in_notebook(lab, saved)
    _screenshot(lab, "explore-papermill")
    assert _decoded(tooltip), tooltip  # one image per point under the pointer
    assert _decoded(gallery) and len(gallery) == k + 1, gallery

    page = run_dir / "explore.html"
    lab.driver.set_network_conditions(
        offline=True, latency=0, download_throughput=0, upload_throughput=0
    )
    try:
        lab.driver.get(page.as_uri())
        tooltip, gallery = hover_and_click(lab.driver, index=5)
        box_select_everything(lab.driver)
        grid = lab.driver.execute_script(_DEEP_IMAGES, ".dmlkit-grid img")
        lab.driver.execute_script(_RECOLOUR)
        time.sleep(1)  # CustomJS callbacks run asynchronously
        recoloured = lab.driver.execute_script(_COLOURS)
        _screenshot(lab, "explore-offline")
        fetched = lab.driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
    finally:
        lab.driver.delete_network_conditions()
    assert _decoded(tooltip), tooltip  # one image per point under the pointer
    assert _decoded(gallery) and len(gallery) == k + 1, gallery
    assert _decoded(grid) and len(grid) == MAX_GRID, len(grid)  # 300 selected, 120 shown
    assert recoloured == ["#2ca02c", "#d62728"], recoloured  # hits green, misses red
    assert not [url for url in fetched if not url.startswith("data:")], fetched
