"""Rendering the admin page in headless Chromium (Debian's ``chromium``) and reading the DOM
its script built.

Import as ``from page_support import ...`` (``tests/admin`` is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tools import require_tool

# Virtual time: the page's one-second timer fires three times without the test waiting 3 s
# (virtual time stands still while a fetch is on the network, so every poll completes).
VIRTUAL_TIME_MS = 3000


def chromium() -> str:
    """Chromium's path; skips locally (naming chromium) or fails under CI when missing."""
    return require_tool("chromium")


async def run_chromium(url: str, profile: Path, *args: str, timeout: float = 60.0) -> str:
    """Run headless Chromium on ``url`` (asynchronously: the page's server may be this very
    loop) and return its stdout."""
    proc = await asyncio.create_subprocess_exec(
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        *args,
        url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode()[-2000:]}"
    return out.decode()


async def dump_dom(url: str, profile: Path) -> str:
    return await run_chromium(url, profile, "--dump-dom")


async def screenshot(url: str, profile: Path, png: Path) -> None:
    await run_chromium(url, profile, f"--screenshot={png}", "--window-size=1200,800")


@dataclass
class Row:
    attrs: dict[str, str]
    cells: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # of the spans inside the cells


class PageDom(HTMLParser):
    """The parts of the rendered page the tests look at."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Row] = []
        self.texts: dict[str, str] = {}  # element id -> its text
        self.targets: list[str] = []  # data-target of each section
        self._row: Row | None = None
        self._cell: list[str] | None = None
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section" and "data-target" in a:
            self.targets.append(a["data-target"])
        elif tag == "tr" and a.get("class") == "endpoint":
            self._row = Row(a)
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "span" and self._row is not None:
            self._row.classes.append(a.get("class", ""))
        if "id" in a:
            self._id = a["id"]
            self.texts[self._id] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.cells.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag in ("span", "div"):
            self._id = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._id is not None:
            self.texts[self._id] += data


def parse_page(html: str) -> PageDom:
    dom = PageDom()
    dom.feed(html)
    dom.close()
    return dom
