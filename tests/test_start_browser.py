"""Kernel start progress and start errors in JupyterLab, in a real browser.

A real JupyterLab (helpers/lab.py) with the sandbox-kernels server extension and panel, driven
by headless Debian Chromium. Opening a notebook on a VM kernel shows the start's phases in the
status bar item until the kernel is idle; a kernelspec that cannot start shows the
provisioner's own message (the setting it names) as a notification and in the item.
With a warm pool ready, the kernel comes from the pool (phase "claimed", no restore or boot), and
the snapshots panel's "Warm pool" section shows the pool. Screenshots go to
`test-artifacts/start-*.png`.

Boots a VM: run it under the heavy lock (`flock /tmp/sk-heavy.lock ...`).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers.lab import (Lab, browser_page, kernelspecs, open_notebook, running_lab, screenshot,
                         wait_notebook_kernel)
from helpers.pool import private_state_root, remove_state_root

pytestmark = pytest.mark.browser

STATUS = "#sk-start-status"
#: A kernelspec that cannot start: Docker with a memory limit below what a kernel needs.
BROKEN = "sk-test-broken-docker"

#: Records every (phase, text) the status item shows, from the page's first script on.
RECORDER = """
window.skStartSeen = [];
new MutationObserver(() => {
    const item = document.getElementById('sk-start-status');
    if (!item) return;
    const text = item.querySelector('.sk-start-text');
    const entry = {phase: item.dataset.phase || '', text: text ? text.textContent : '',
                   elapsed: (item.querySelector('.sk-start-elapsed') || {}).textContent || ''};
    const last = window.skStartSeen[window.skStartSeen.length - 1];
    if (!last || last.phase !== entry.phase || last.text !== entry.text) window.skStartSeen.push(entry);
}).observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
"""


def _broken_kernelspec(share: Path) -> None:
    """`sandbox-docker` with memory "1k", in a JUPYTER_PATH directory of the test's own."""
    spec = {
        "argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (Docker, broken)", "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "sandbox-docker-provisioner",
                                            "config": {"memory": "1k"}}},
    }
    folder = share / "kernels" / BROKEN
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A real `jupyter lab` with the warm pool off and the broken kernelspec installed, with a
    state root of its own (no other test's pool agent is in sight)."""
    base = tmp_path_factory.mktemp("lab")
    _broken_kernelspec(base / "share")
    state = private_state_root()
    env = {"JUPYTER_PATH": str(base / "share"), "NIXOS_VM_POOL_SIZE": "0",
           "SANDBOX_KERNELS_STATE_DIR": str(state)}
    try:
        with running_lab(base, env=env) as lab:
            yield lab
    finally:
        remove_state_root(state)


@pytest.fixture(scope="module")
def pool_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A real `jupyter lab` with a VM warm pool of one; its agent is stopped afterwards."""
    state = private_state_root()
    env = {"NIXOS_VM_POOL_SIZE": "1", "SANDBOX_KERNELS_STATE_DIR": str(state)}
    try:
        with running_lab(tmp_path_factory.mktemp("pool-lab"), env=env) as lab:
            yield lab
    finally:
        remove_state_root(state)


async def _seen(page: Any) -> list[dict[str, str]]:
    return await page.evaluate("window.skStartSeen")


@pytest.mark.vm
async def test_a_vm_kernel_start_shows_its_phases(lab: Lab) -> None:
    if "sandbox-nixos-vm" not in kernelspecs():
        pytest.skip("kernelspec sandbox-nixos-vm is not installed")
    async with browser_page(lab) as page:
        await page.add_init_script(RECORDER)
        name = await open_notebook(page, lab, "sandbox-nixos-vm", wait_idle=False)
        item = page.locator(STATUS)
        await page.locator(f"{STATUS}:is([data-phase='restoring'], [data-phase='booting'], "
                           f"[data-phase='connecting'], [data-phase='starting'])").wait_for(timeout=120_000)
        await screenshot(page, "start-vm-progress")
        await wait_notebook_kernel(page, lab, name)
        await item.wait_for(state="hidden", timeout=60_000)  # cleared shortly after ready
        seen = await _seen(page)
        phases = [s["phase"] for s in seen if s["phase"]]
        assert {"restoring", "booting"} & set(phases), seen
        assert "connecting" in phases and phases[-1] == "ready", seen
        assert "failed" not in phases, seen
        for entry in seen:
            if entry["phase"] not in ("", "ready"):
                assert entry["text"].startswith("Python (NixOS VM): ") and entry["text"].endswith("…"), entry
                assert re.fullmatch(r"\d+\.\d s", entry["elapsed"]), entry


@pytest.mark.docker
async def test_a_kernel_that_cannot_start_shows_the_provisioners_message(lab: Lab) -> None:
    async with browser_page(lab) as page:
        await page.add_init_script(RECORDER)
        await open_notebook(page, lab, BROKEN, wait_idle=False)
        toast = page.locator(".Toastify__toast", has_text="failed to start")
        await toast.wait_for(timeout=120_000)
        text = await toast.inner_text()
        assert "Python (Docker, broken) failed to start" in text and "memory='1k'" in text, text
        item = page.locator(f"{STATUS}[data-phase='failed']")
        await item.wait_for()
        assert "memory='1k' is too small" in await item.inner_text()
        # JupyterLab's own dialog about the failed session (it carries the server's error text):
        # out of the way, then the picture, then Details: the whole message in a dialog.
        own = page.locator(".jp-Dialog", has_text="Error Starting Kernel")
        await own.wait_for()
        await own.locator(".jp-Dialog-button.jp-mod-accept").click()
        select = page.locator(".jp-Dialog", has_text="Select Kernel")  # it offers another kernel next
        await select.get_by_role("button", name="No Kernel").click()
        await select.wait_for(state="detached")
        await page.locator(".Toastify__toast:not(.Toastify--animate)", has_text="failed to start").wait_for()
        await screenshot(page, "start-failed")
        await toast.get_by_role("button", name="Details").click()
        dialog = page.locator(".jp-Dialog", has_text="memory='1k' is too small")
        await dialog.wait_for()
        assert "64m or more" in await dialog.inner_text()
        await page.keyboard.press("Escape")
        await dialog.wait_for(state="detached")

        # The snapshots panel's "Warm pool" section: no pool on this server.
        await page.locator(".jp-SideBar .lm-TabBar-tab[data-id='sk-snapshots-panel']").click()
        await page.locator("#sk-pool-section[data-state='off']").wait_for()


async def _wait_pool_ready(lab: Lab, kernel_name: str, timeout: float = 300) -> dict[str, Any]:
    """Poll the server's pool endpoint until a pool of ``kernel_name`` has a ready member."""
    deadline = time.monotonic() + timeout
    while True:
        report = lab.api("GET", "sandbox-kernels/api/pool")
        ready = [p for p in report["pools"] if p["kernel_name"] == kernel_name and p["ready"] >= 1]
        if ready:
            return ready[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no ready {kernel_name} pool member within {timeout:g} s: {report}")
        await asyncio.sleep(1)


@pytest.mark.vm
async def test_with_the_pool_ready_the_kernel_comes_from_the_pool(pool_lab: Lab) -> None:
    if "sandbox-nixos-vm" not in kernelspecs():
        pytest.skip("kernelspec sandbox-nixos-vm is not installed")
    # The first start finds no agent: it starts one (which fills the pool) and starts cold.
    first = pool_lab.api("POST", "api/kernels", {"name": "sandbox-nixos-vm"}, timeout=300)
    pool_lab.api("DELETE", f"api/kernels/{first['id']}", timeout=120)
    pool = await _wait_pool_ready(pool_lab, "sandbox-nixos-vm")
    assert pool["runtime"] == "libvirt" and pool["target"] == 1, pool
    async with browser_page(pool_lab) as page:
        await page.add_init_script(RECORDER)
        name = await open_notebook(page, pool_lab, "sandbox-nixos-vm", wait_idle=False)
        await wait_notebook_kernel(page, pool_lab, name)
        await page.locator(STATUS).wait_for(state="hidden", timeout=60_000)
        phases = [s["phase"] for s in await _seen(page) if s["phase"]]
        assert "claimed" in phases and phases[-1] == "ready", phases
        assert not {"restoring", "booting", "failed"} & set(phases), phases
        # The panel's "Warm pool" section lists the pool (refilling, or ready again).
        await page.locator(".jp-SideBar .lm-TabBar-tab[data-id='sk-snapshots-panel']").click()
        row = page.locator("#sk-pool-section[data-state='ready'] .sk-pool-row[data-kernel-name='sandbox-nixos-vm']")
        await row.wait_for(timeout=30_000)
        assert "Python (NixOS VM):" in await row.inner_text()
        await screenshot(page, "start-vm-pool")
