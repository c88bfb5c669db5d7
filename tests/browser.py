"""Open an HTML report in headless Chromium and check what a reader would see.

Talks the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (JSON messages separated by
NUL bytes on file descriptors 3 and 4 of the browser): no port, no websocket library. The check
records every network request the page makes, measures every figure as laid out, and keeps a
full-page screenshot. Tests skip where Debian's ``chromium`` is not installed (CI installs it).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BROWSER = "chromium"
TIMEOUT = 60.0

FIGURES_JS = """
Array.from(document.images).map(img => {
  const box = img.getBoundingClientRect();
  return {alt: img.alt, complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
          shown: [box.width, box.height], inline: img.src.startsWith('data:')};
})
"""


def chromium() -> str:
    """The browser's path; skips the test where it is not installed."""
    path = shutil.which(BROWSER)
    if path is None:
        pytest.skip(f"{BROWSER} is not installed (apt-get install chromium)")
    return path


@dataclass
class PageCheck:
    requests: list[str]
    """Every URL the page asked for, the page itself included."""
    figures: list[dict[str, Any]]
    screenshot: Path
    events: list[str] = field(default_factory=list)


class DevTools:
    """One headless Chromium, driven over its DevTools pipe."""

    def __init__(self, profile: Path):
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def descriptors() -> None:  # in the child: the protocol's fds 3 (commands in) and 4 (replies out)
            commands, replies = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_read, from_browser_write))
            os.dup2(commands, 3)  # via fds >= 10, so neither lands on the other's source
            os.dup2(replies, 4)

        args = [
            chromium(),
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            args, preexec_fn=descriptors, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._next_id, self._buffer, self.events = 0, b"", []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise ConnectionError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept in ``events``."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        """The first event ``method`` (already received or still to come)."""
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + TIMEOUT
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError, ConnectionError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def open_report(page: Path, screenshot: Path, width: int = 1280) -> PageCheck:
    """Load ``page`` in headless Chromium; the requests it made, its figures as laid out, and a
    full-page screenshot written to ``screenshot``."""
    browser = DevTools(screenshot.parent / f".{screenshot.stem}-profile")
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            browser.send(f"{domain}.enable", session)
        browser.send(
            "Emulation.setDeviceMetricsOverride", session, width=width, height=900, deviceScaleFactor=1, mobile=False
        )
        browser.send("Page.navigate", session, url=page.resolve().as_uri())
        browser.wait_for("Page.loadEventFired")
        figures = browser.send("Runtime.evaluate", session, expression=FIGURES_JS, returnByValue=True)["result"][
            "value"
        ]
        size = browser.send("Page.getLayoutMetrics", session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = browser.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True, clip=clip)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        requests = [
            e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"
        ]
        return PageCheck(requests, figures, screenshot, [str(e.get("method")) for e in browser.events])
    finally:
        browser.close()


def check_report_renders(page: Path, screenshot: Path, min_figures: int) -> PageCheck:
    """The report loads with no network request (only the page itself; figures are inline), every
    figure is decoded and laid out with a non-zero size, and the screenshot is kept."""
    check = open_report(page, screenshot)
    print(f"screenshot of {page}: {check.screenshot}")
    fetched = [url for url in check.requests if url != page.resolve().as_uri() and not url.startswith("data:")]
    assert not fetched, f"the report fetched {fetched}"
    assert len(check.figures) >= min_figures, check.figures
    for figure in check.figures:
        assert figure["complete"] and figure["inline"], figure
        assert min(figure["natural"]) > 0 and min(figure["shown"]) > 0, figure
    assert check.screenshot.stat().st_size > 10_000
    return check
