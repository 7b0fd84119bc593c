"""A real JupyterLab server and headless Chromium, for the browser tests.

A subprocess of `.venv/bin/jupyter lab` with the sandbox-kernels server extension and the
prebuilt panel, driven by Debian's `/usr/bin/chromium` through Playwright.

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

REPO = Path(__file__).resolve().parent.parent.parent
JUPYTER = REPO / ".venv" / "bin" / "jupyter"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
#: The notebook on screen.
NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"
#: Seconds allowed for a sandbox kernel to start.
KERNEL_TIMEOUT = 180


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_lab(proc: subprocess.Popen[bytes], lab: Lab) -> None:
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


@contextlib.contextmanager
def running_lab(base: Path, env: dict[str, str] | None = None) -> Iterator[Lab]:
    """A real `jupyter lab` on a free port of 127.0.0.1, in ``base`` (a fresh directory),
    stopped on exit even on failure. ``env``: extra environment of the server."""
    if not JUPYTER.exists():
        pytest.fail(f"{JUPYTER} not found: run scripts/setup.sh first")
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
    port, token = free_port(), secrets.token_hex(16)
    lab = Lab(f"http://127.0.0.1:{port}", token, root, base / "jupyter-lab.log")
    server_env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config),
                  "JUPYTER_RUNTIME_DIR": str(base / "runtime"), **(env or {})}
    argv = [
        str(JUPYTER), "lab", "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", "--allow-root",
        f"--ServerApp.root_dir={root}", "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    with lab.log.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=root, env=server_env, stdout=log, stderr=subprocess.STDOUT,
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
        stop_lab(proc, lab)


@contextlib.asynccontextmanager
async def browser_page(lab: Lab) -> AsyncIterator[Any]:
    """A page of headless Debian Chromium (Playwright's own browsers are never downloaded),
    not yet at any address. Browser console errors are printed, so a failing test's report
    shows them."""
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
            yield page
        finally:
            await browser.close()
            if console:
                print("browser console errors:\n  " + "\n  ".join(console))


@contextlib.asynccontextmanager
async def chromium(lab: Lab, kernel_name: str) -> AsyncIterator[Any]:
    """A :func:`browser_page` showing a new notebook for `kernel_name` whose kernel is idle."""
    async with browser_page(lab) as page:
        await open_notebook(page, lab, kernel_name)
        yield page


def kernelspecs() -> set[str]:
    """The kernelspecs installed for the test environment's `jupyter`."""
    out = subprocess.run([str(JUPYTER), "kernelspec", "list", "--json"], capture_output=True,
                         text=True, check=True, timeout=60)
    return set(json.loads(out.stdout)["kernelspecs"])


async def open_notebook(page: Any, lab: Lab, kernel_name: str, wait_idle: bool = True) -> str:
    """Create an empty notebook for `kernel_name` and open it; with ``wait_idle``, wait until
    its kernel is idle. Returns the notebook's name."""
    spec = lab.api("GET", "api/kernelspecs")["kernelspecs"][kernel_name]["spec"]
    name = f"nb-{kernel_name}-{secrets.token_hex(3)}.ipynb"
    notebook = {
        "cells": [], "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": kernel_name, "display_name": spec["display_name"],
                                    "language": spec.get("language", "python")}},
    }
    lab.api("PUT", f"api/contents/{name}", {"type": "notebook", "format": "json", "content": notebook})
    await page.goto(f"{lab.url}/lab/tree/{name}?reset&token={lab.token}")
    await page.locator(f"{NOTEBOOK} .jp-CodeCell").first.wait_for()
    if wait_idle:
        await wait_notebook_kernel(page, lab, name)
    return name


async def wait_notebook_kernel(page: Any, lab: Lab, name: str, timeout: float = KERNEL_TIMEOUT) -> None:
    """Wait until the kernel of the open notebook ``name`` is idle, on the server and on the page.

    The toolbar's indicator reads "idle" before the session exists: first wait for the server
    to have started the notebook's kernel, then for the page to be connected to it.
    """
    deadline = time.monotonic() + timeout
    while not any(s["path"] == name and s["kernel"]["execution_state"] == "idle"
                  for s in lab.api("GET", "api/sessions")):
        if time.monotonic() > deadline:
            raise AssertionError(f"the kernel of {name} did not start:\n{lab.log_tail()}")
        await asyncio.sleep(0.5)
    await wait_kernel_idle(page)


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


async def run_command(page: Any, label: str) -> None:
    """Run a command by its label from the command palette."""
    await page.keyboard.press("ControlOrMeta+Shift+c")
    palette = page.locator(".jp-ModalCommandPalette input")
    await palette.fill(label)
    await page.locator(".jp-ModalCommandPalette .lm-CommandPalette-item.lm-mod-active",
                       has_text=label).wait_for()
    await page.keyboard.press("Enter")


async def screenshot(page: Any, name: str) -> Path:
    """Save a screenshot of the page as `test-artifacts/<name>.png`."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path))
    return path
