"""A real headless browser for testing the HTML pages we write: Debian's Chromium driven by Playwright.

CI installs both (``.ci/run``: ``apt-get install chromium``, the ``browser`` extra), so there a missing
browser fails; a developer without them skips these tests. Playwright's own browser download is never
used: ``CHROMIUM`` (default ``/usr/bin/chromium``) is launched with the flags below, offline.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


def chromium_path() -> str:
    """The Chromium executable: required under CI, else the test skips."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        if os.environ.get("CI"):
            raise RuntimeError(f"no Chromium at {path}: .ci/run installs it with apt-get install chromium")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return path


@dataclass
class Visit:
    """What loading one page produced."""

    url: str
    errors: list[str] = field(default_factory=list)      # console errors and uncaught exceptions
    requests: list[str] = field(default_factory=list)    # anything fetched that is not the file or a data: URI
    title: str = ""


@contextmanager
def browser() -> Iterator[Any]:
    """A launched headless Chromium (Playwright ``Browser``)."""
    if os.environ.get("CI"):
        from playwright.sync_api import sync_playwright
    else:
        sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    exe = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


def visit(b: Any, path: Path, screenshot: Path | None = None, action: Any = None) -> Visit:
    """Open ``path`` in a fresh page, wait for it to load, optionally run ``action(page)`` and screenshot it."""
    page = b.new_page(viewport={"width": 1200, "height": 900})
    v = Visit(path.resolve().as_uri())
    page.on("console", lambda m: v.errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: v.errors.append(f"uncaught: {e}"))
    page.on("request", lambda r: v.requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(v.url, wait_until="load")
    v.title = page.title()
    if action is not None:
        action(page)
    if screenshot is not None:
        page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    return v
