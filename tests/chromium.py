"""A real headless Chromium driven over the DevTools protocol (CDP) on a pipe: open a local page,
collect console errors, exceptions and network requests, take a screenshot. Standard library only
(`--remote-debugging-pipe`: JSON messages, NUL-terminated, Chromium reads fd 3, writes fd 4)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    images: int = 0
    broken_images: int = 0
    title: str = ""
    screenshot: bytes = b""


class Chromium:
    def __init__(self, binary: str, width: int = 1280, height: int = 900, timeout: float = 60):
        self.profile = tempfile.mkdtemp(prefix="kseg-chromium-")
        read_ours, write_theirs = os.pipe()  # Chromium writes fd 4
        read_theirs, write_ours = os.pipe()  # Chromium reads fd 3
        self.timeout = timeout
        self.width, self.height = width, height

        def plumb() -> None:
            os.dup2(read_theirs, 3)
            os.dup2(write_theirs, 4)

        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=plumb,
        )
        os.close(read_theirs)
        os.close(write_theirs)
        self._out = os.fdopen(write_ours, "wb", buffering=0)
        self._in = os.fdopen(read_ours, "rb", buffering=0)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = self._in.read(65536)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            reply = self._read_message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(method)

    def wait_for(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while time.monotonic() < deadline:
            event = self._read_message()
            self.events.append(event)
            if event.get("method") == method:
                return event
        raise TimeoutError(method)

    def check_page(self, path: Path) -> PageCheck:
        """Open `path`, wait for its load event, and report what a user would see go wrong."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=self.width,
                  height=self.height, deviceScaleFactor=1, mobile=False)  # fmt: skip
        self.events.clear()
        self.send("Page.navigate", session, url=Path(path).resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        check = PageCheck()
        state = self.send(
            "Runtime.evaluate",
            session,
            expression=(
                "JSON.stringify({title: document.title, images: document.images.length, "
                "broken: Array.from(document.images).filter("
                "i => !i.complete || i.naturalWidth === 0).length})"
            ),
            returnByValue=True,
        )
        page = json.loads(state["result"]["value"])
        check.title, check.images, check.broken_images = (
            page["title"],
            page["images"],
            page["broken"],
        )
        metrics = self.send("Page.getLayoutMetrics", session)["cssContentSize"]
        shot = self.send(
            "Page.captureScreenshot",
            session,
            format="png",
            captureBeyondViewport=False,
            clip={
                "x": 0,
                "y": 0,
                "width": min(metrics["width"], self.width),
                "height": self.height,
                "scale": 1,
            },
        )
        check.screenshot = base64.b64decode(shot["data"])
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                check.console_errors.append(json.dumps(params.get("args")))
            elif method == "Runtime.exceptionThrown":
                check.console_errors.append(json.dumps(params.get("exceptionDetails")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                check.console_errors.append(params["entry"].get("text", ""))
            elif method == "Network.requestWillBeSent":
                check.requests.append(params["request"]["url"])
        return check

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._in.close()
        self._out.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
