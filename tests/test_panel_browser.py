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

import re
from typing import Any, Iterator

import pytest

from helpers.lab import Lab, chromium, kernelspecs, run_cell, run_command, running_lab, wait_kernel_idle
from helpers.lab import screenshot as save_screenshot

pytestmark = pytest.mark.browser

PANEL_ID = "sk-snapshots-panel"
#: Seconds allowed for one snapshot operation.
OPERATION_TIMEOUT = 300


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A real `jupyter lab` (see helpers/lab.py), stopped on teardown even on failure."""
    with running_lab(tmp_path_factory.mktemp("lab")) as lab:
        yield lab


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


async def screenshot(page: Any, name: str) -> None:
    await save_screenshot(page, f"panel-{name}")


@pytest.mark.parametrize("kernel_name", [
    pytest.param("sandbox-docker", marks=pytest.mark.docker),
    pytest.param("sandbox-nixos-vm", marks=pytest.mark.vm),
])
async def test_snapshot_and_rollback_from_the_panel(lab: Lab, kernel_name: str) -> None:
    if kernel_name not in kernelspecs():
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
