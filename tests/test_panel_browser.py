"""The JupyterLab snapshots panel in a real browser.

A real JupyterLab server (a subprocess of `.venv/bin/jupyter lab`) with the sandbox-kernels
server extension and the prebuilt panel, driven by headless Chromium (Debian's
`/usr/bin/chromium`) through Playwright. A notebook on a sandbox kernel defines a variable and
writes a file, the panel snapshots the sandbox, more state is added, the panel rolls back, and a
last cell shows what survived. Screenshots go to `test-artifacts/panel-<kernel>.png`.

Needs: `apt-get install chromium`, `pip install playwright` (never `playwright install`: the
system Chromium is used), and the panel built and installed (`scripts/build-panel.sh`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
JUPYTER = REPO / ".venv" / "bin" / "jupyter"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PANEL_ID = "sk-snapshots-panel"
#: The notebook on screen.
NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"
#: Seconds allowed for a sandbox kernel to start, and for one snapshot operation.
KERNEL_TIMEOUT = 180
OPERATION_TIMEOUT = 300


@dataclass
class Lab:
    """A running JupyterLab server."""

    url: str
    token: str
    root: Path
    log: Path

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        """Call the server's REST API with the token; returns the decoded JSON (or None)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}/{path.lstrip('/')}", data=data, method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes], lab: Lab) -> None:
    """Shut the kernels down through the API, then stop the server's whole process group."""
    if proc.poll() is None:
        try:
            for session in lab.api("GET", "api/sessions"):
                lab.api("DELETE", f"api/sessions/{session['id']}", timeout=120)
            for kernel in lab.api("GET", "api/kernels"):
                lab.api("DELETE", f"api/kernels/{kernel['id']}", timeout=120)
        except (OSError, urllib.error.URLError):
            pass  # the server is failing anyway: SIGTERM below still shuts its kernels down
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A real `jupyter lab` on a free port of 127.0.0.1, stopped on teardown even on failure."""
    if not JUPYTER.exists():
        pytest.fail(f"{JUPYTER} not found: run scripts/setup.sh first")
    base = tmp_path_factory.mktemp("lab")
    root, config = base / "root", base / "config"
    root.mkdir()
    # A private config dir: no user settings or workspaces leak in, and the server extension
    # is on even before the package's own jupyter-config file is installed.
    (config / "jupyter_server_config.d").mkdir(parents=True)
    (config / "jupyter_server_config.d" / "sandbox-kernels-test.json").write_text(
        json.dumps({"ServerApp": {"jpserver_extensions": {"jupyter_server_ext": True}}})
    )
    # No "official Jupyter news?" toast over the screenshots.
    (config / "labconfig").mkdir()
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    port, token = _free_port(), secrets.token_hex(16)
    lab = Lab(f"http://127.0.0.1:{port}", token, root, base / "jupyter-lab.log")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_RUNTIME_DIR": str(base / "runtime")}
    argv = [
        str(JUPYTER), "lab", "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", "--allow-root",
        f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    with lab.log.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{lab.log_tail()}")
            try:
                lab.api("GET", "api/status", timeout=5)
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer within 90 s:\n{lab.log_tail()}")
                time.sleep(0.5)
        try:
            lab.api("GET", "sandbox-kernels/api/runtimes", timeout=60)
        except urllib.error.HTTPError as e:
            pytest.fail(f"the sandbox-kernels server extension does not answer ({e}):\n{lab.log_tail()}")
        page = urllib.request.urlopen(f"{lab.url}/lab?token={token}", timeout=30).read().decode()
        if "sandbox-kernels-panel" not in page:
            pytest.fail("JupyterLab does not list the sandbox-kernels-panel extension: run "
                        "scripts/build-panel.sh (`jupyter labextension list` must show it enabled)")
        yield lab
    finally:
        _stop(proc, lab)


@contextlib.asynccontextmanager
async def chromium(lab: Lab, kernel_name: str) -> AsyncIterator[Any]:
    """A page of headless Debian Chromium (Playwright's own browsers are never downloaded).

    The page shows a new notebook for `kernel_name` whose kernel is idle. Browser console
    errors are printed, so a failing test's report shows them.
    """
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install playwright (never `playwright install`)")
    console: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = await browser.new_context(viewport={"width": 1440, "height": 900})
            context.set_default_timeout(30_000)
            page = await context.new_page()
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))
            await open_notebook(page, lab, kernel_name)
            yield page
        finally:
            await browser.close()
            if console:
                print("browser console errors:\n  " + "\n  ".join(console))


def _kernelspecs() -> set[str]:
    out = subprocess.run([str(JUPYTER), "kernelspec", "list", "--json"], capture_output=True,
                         text=True, check=True, timeout=60)
    return set(json.loads(out.stdout)["kernelspecs"])


async def open_notebook(page: Any, lab: Lab, kernel_name: str) -> str:
    """Create an empty notebook for `kernel_name`, open it, and wait until its kernel is idle."""
    spec = lab.api("GET", "api/kernelspecs")["kernelspecs"][kernel_name]["spec"]
    name = f"panel-{kernel_name}-{secrets.token_hex(3)}.ipynb"
    notebook = {
        "cells": [], "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": kernel_name, "display_name": spec["display_name"],
                                    "language": spec.get("language", "python")}},
    }
    lab.api("PUT", f"api/contents/{name}", {"type": "notebook", "format": "json", "content": notebook})
    await page.goto(f"{lab.url}/lab/tree/{name}?reset&token={lab.token}")
    await page.locator(f"{NOTEBOOK} .jp-CodeCell").first.wait_for()
    # The toolbar's indicator reads "idle" before the session exists: first wait for the
    # server to have started the notebook's kernel, then for the page to be connected to it.
    deadline = time.monotonic() + KERNEL_TIMEOUT
    while not any(s["path"] == name and s["kernel"]["execution_state"] == "idle"
                  for s in lab.api("GET", "api/sessions")):
        if time.monotonic() > deadline:
            raise AssertionError(f"the {kernel_name} kernel of {name} did not start:\n{lab.log_tail()}")
        await asyncio.sleep(0.5)
    await wait_kernel_idle(page)
    return name


async def wait_kernel_idle(page: Any, timeout: float = KERNEL_TIMEOUT) -> None:
    """Wait for the notebook toolbar's kernel indicator to read idle."""
    await page.locator(f"{NOTEBOOK} .jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(
        timeout=timeout * 1000)


async def run_cell(page: Any, code: str, timeout: float = KERNEL_TIMEOUT) -> str:
    """Type `code` into the notebook's last cell, run it, and return its output text."""
    from playwright.async_api import expect

    cells = page.locator(f"{NOTEBOOK} .jp-CodeCell")
    index = await cells.count() - 1
    cell = cells.nth(index)
    await cell.locator(".cm-content").click()
    await page.keyboard.press("ControlOrMeta+a")
    await page.keyboard.insert_text(code)
    await page.keyboard.press("Shift+Enter")
    await expect(cell.locator(".jp-InputArea-prompt")).to_have_text(
        re.compile(r"\s*\[\d+\]:\s*"), timeout=timeout * 1000)
    errors = cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    if await errors.count():
        raise AssertionError(f"cell {index} wrote to stderr: {await errors.first.inner_text()}")
    return "\n".join(await cell.locator(".jp-OutputArea-output").all_inner_texts()).strip()


async def open_panel(page: Any) -> Any:
    """Click the panel's tab in the right sidebar; returns the panel's view."""
    await page.locator(f".jp-SideBar .lm-TabBar-tab[data-id='{PANEL_ID}']").click()
    view = page.locator(f"#{PANEL_ID} .sk-view")
    await view.wait_for()
    return view


async def wait_operation(page: Any, expect_state: str = "done", timeout: float = OPERATION_TIMEOUT) -> str:
    """Wait until the panel's status line leaves 'busy'; check its state; return its text."""
    status = page.locator(f"#{PANEL_ID} .sk-status:is([data-state='done'], [data-state='error'])")
    await status.wait_for(timeout=timeout * 1000)
    text = await status.inner_text()
    assert await status.get_attribute("data-state") == expect_state, f"status: {text}"
    return text


async def record_status(page: Any) -> None:
    """Record every state of the status line (and whether the buttons were disabled) from now on."""
    await page.evaluate("""() => {
        const panel = document.getElementById('%s');
        const status = panel.querySelector('.sk-status');
        window.skStatusSeen = [];
        new MutationObserver(() => window.skStatusSeen.push({
            state: status.dataset.state,
            text: status.textContent,
            buttonsDisabled: [...panel.querySelectorAll('.sk-view button')].every(b => b.disabled),
        })).observe(status, {attributes: true, childList: true, subtree: true, characterData: true});
    }""" % PANEL_ID)


async def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"panel-{name}.png"
    await page.screenshot(path=str(path))
    return path


@pytest.mark.parametrize("kernel_name", [
    pytest.param("sandbox-docker", marks=pytest.mark.docker),
    pytest.param("sandbox-nixos-vm", marks=pytest.mark.vm),
])
async def test_snapshot_and_rollback_from_the_panel(lab: Lab, kernel_name: str) -> None:
    if kernel_name not in _kernelspecs():
        pytest.skip(f"kernelspec {kernel_name} is not installed")
    async with chromium(lab, kernel_name) as page:
        from playwright.async_api import TimeoutError as PlaywrightTimeout

        assert await run_cell(page, "x = 1\nopen('sk-before.txt', 'w').write('before');") == ""

        view = await open_panel(page)
        await page.locator(f"#{PANEL_ID} .sk-view[data-state='ready']").wait_for(timeout=60_000)
        kinds = [await o.get_attribute("value") for o in await page.locator("#sk-create-kind option").all()]
        assert kinds, "the kind selector is empty"
        if kernel_name == "sandbox-nixos-vm":  # the header says which guest OS "NixOS VM" runs
            guest = await view.locator(".sk-sandbox").inner_text()
            assert guest.startswith("NixOS") or "not NixOS" in guest, guest
        else:
            assert await view.locator(".sk-sandbox").is_hidden()
        name, create = page.locator("#sk-create-name"), page.locator("#sk-create-button")
        await name.fill("not a name!")
        assert await create.is_disabled(), "an invalid name must disable Create"
        await name.fill("before")
        await create.click()
        assert "Snapshot “before” created" in await wait_operation(page)
        row = view.locator(".sk-snapshot-row[data-name='before']")
        await row.wait_for()
        kind = await row.get_attribute("data-kind")
        assert kind in kinds
        # The server's refusal is shown as the status line's error.
        await name.fill("before")
        await create.click()
        error = await wait_operation(page, expect_state="error")
        assert "Snapshot failed" in error and "already exists" in error, error

        assert await run_cell(page, "y = 2\nopen('sk-after.txt', 'w').write('after');") == ""

        await row.locator(".sk-rollback").click()
        dialog = page.locator(".jp-Dialog")
        assert "Roll back kernel to before? Variables defined after it are lost." in await dialog.inner_text()
        await record_status(page)
        await dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
        try:  # a picture of the running operation, when it lasts long enough for one
            await page.locator(f"#{PANEL_ID} .sk-status[data-state='busy']").wait_for(timeout=2_000)
            await screenshot(page, f"{kernel_name}-busy")
        except PlaywrightTimeout:
            pass
        assert "Rolled back to “before”" in await wait_operation(page)
        busy = [s for s in await page.evaluate("window.skStatusSeen") if s["state"] == "busy"]
        assert busy, "the status line never showed the running rollback"
        assert all(s["buttonsDisabled"] for s in busy), f"buttons enabled while busy: {busy}"
        assert all(re.search(r"Rolling back to “before”….*\d+ s$", s["text"]) for s in busy), busy
        await wait_kernel_idle(page)

        out = await run_cell(page, "import os\n"
                                   "print('y' in globals(), 'x' in globals(),\n"
                                   "      os.path.exists('sk-before.txt'), os.path.exists('sk-after.txt'))")
        # A memory snapshot (VM) keeps the variables; a filesystem or disk snapshot restarts the
        # kernel. Either way the files are those of the moment of the snapshot.
        x_kept = kind == "memory"
        assert out == f"False {x_kept} True False", f"after rolling back a {kind} snapshot: {out!r}"
        await screenshot(page, kernel_name)


async def test_not_sandboxed_kernel_shows_message(lab: Lab) -> None:
    async with chromium(lab, "python3") as page:
        # Through the command palette, which must list the panel's three commands.
        await page.keyboard.press("ControlOrMeta+Shift+c")
        palette = page.locator(".jp-ModalCommandPalette input")
        await palette.fill("Sandbox:")
        labels = await page.locator(".jp-ModalCommandPalette .lm-CommandPalette-itemLabel").all_inner_texts()
        for label in ("Sandbox: Create snapshot", "Sandbox: Roll back to latest snapshot",
                      "Sandbox: Show snapshots panel"):
            assert label in labels
        await page.keyboard.press("Escape")
        await run_command(page, "Sandbox: Show snapshots panel")
        view = page.locator(f"#{PANEL_ID} .sk-view[data-state='not-sandboxed']")
        await view.wait_for(timeout=60_000)
        message = await view.locator(".sk-message").inner_text()
        assert "This kernel is not sandboxed" in message
        assert "not started by a sandbox provisioner" in message
        assert await view.locator("#sk-create-button").is_hidden()
        await screenshot(page, "python3")


async def run_command(page: Any, label: str) -> None:
    """Run a command by its label from the command palette."""
    await page.keyboard.press("ControlOrMeta+Shift+c")
    palette = page.locator(".jp-ModalCommandPalette input")
    await palette.fill(label)
    await page.locator(".jp-ModalCommandPalette .lm-CommandPalette-item.lm-mod-active",
                       has_text=label).wait_for()
    await page.keyboard.press("Enter")


@pytest.mark.docker
async def test_palette_commands_create_and_roll_back(lab: Lab) -> None:
    async with chromium(lab, "sandbox-docker") as page:
        assert await run_cell(page, "open('sk-palette.txt', 'w').write('kept');") == ""
        await run_command(page, "Sandbox: Create snapshot")
        dialog = page.locator(".jp-Dialog")
        await dialog.locator("input").fill("from-palette")
        await dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
        assert "Snapshot “from-palette” created" in await wait_operation(page)
        assert await run_cell(page, "import os\nos.remove('sk-palette.txt')") == ""

        await run_command(page, "Sandbox: Roll back to latest snapshot")
        assert "Roll back kernel to from-palette?" in await dialog.inner_text()
        await dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
        assert "Rolled back to “from-palette”" in await wait_operation(page)
        await wait_kernel_idle(page)
        assert await run_cell(page, "import os\nprint(os.path.exists('sk-palette.txt'))") == "True"
