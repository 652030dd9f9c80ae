"""The documentation site builds, and its settings reference is the code's.

`mkdocs build --strict` fails on a broken link or anchor and on a page left out of the nav.
The settings tables are generated from `proxy.app.config.SETTINGS` by docs/hooks/settings.py; the
checks here read the built page, so a setting added to the code without reaching the page, or
a table copied into the page by hand, fails.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from proxy.app.config import SETTINGS, Setting

REPO = Path(__file__).resolve().parents[2]
SETTINGS_SOURCE = REPO / "docs" / "reference" / "settings.md"
MARKER = "<!-- settings-table -->"
README_MAX_LINES = 120


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    return out


class _Tables(HTMLParser):
    """The text of every table cell, row by row, and the ids of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.ids: set[str] = set()
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def settings_page(site: Path) -> _Tables:
    parser = _Tables()
    parser.feed((site / "reference" / "settings" / "index.html").read_text())
    return parser


def _row_of(setting: Setting, rows: list[list[str]]) -> list[str]:
    """The table row of one setting: the one whose TOML key (or flag, or env) is its own."""
    for row in rows:
        if len(row) != 6:
            continue
        flag, env, toml = row[0], row[1], row[2]
        if setting.in_flags and env == setting.env:
            return row
        if not setting.in_flags and toml.startswith(f"[{setting.name}."):
            return row
        if setting.in_flags and flag.split(" ")[0].rstrip(",") == setting.flag:
            return row
    raise AssertionError(f"setting {setting.name!r} has no row on the built settings page")


def test_site_builds_strict(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "reference" / "settings" / "index.html").is_file()


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_every_setting_is_on_the_built_page(settings_page: _Tables, setting: Setting) -> None:
    page = settings_page
    flag, env, toml, default, meaning, sighup = _row_of(setting, page.rows)
    if setting.in_flags:
        assert flag.split(" ")[0].rstrip(",") == setting.flag
        assert env == setting.env
    else:
        # File-only (`[targets.NAME]`): no flag, no variable.
        assert (flag, env) == ("—", "—")
    if setting.in_file:
        assert toml.startswith((setting.name, f"[{setting.name}."))
    else:
        assert toml == "—"
    # The help text as the code has it (its `code` spans are rendered as code).
    assert meaning == " ".join(setting.help.replace("`", "").split())
    assert sighup.startswith("yes") == setting.reloadable
    assert default, f"{setting.name}: empty default cell"
    assert f"setting-{setting.name}" in page.ids


def test_no_row_on_the_page_without_a_setting(settings_page: _Tables) -> None:
    rows = [row for row in settings_page.rows if len(row) == 6 and row[0] != "Flag"]
    assert len(rows) == len(SETTINGS)


def test_settings_table_is_not_kept_by_hand() -> None:
    source = SETTINGS_SOURCE.read_text()
    assert source.count(MARKER) == 1
    # A row of a hand-written copy would start with a flag or a variable in code.
    hand_rows = [
        line for line in source.splitlines() if re.match(r"\|\s*`(--|GRPC_ETCD_PROXY_)", line)
    ]
    assert not hand_rows, f"{SETTINGS_SOURCE.name} holds settings rows by hand: {hand_rows[:3]}"


def test_built_page_has_no_marker_left(site: Path) -> None:
    built = (site / "reference" / "settings" / "index.html").read_text()
    assert MARKER not in html.unescape(built)


def test_readme_is_short_and_links_into_docs() -> None:
    readme = (REPO / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert "docs/index.md" in links
    for link in links:
        assert (REPO / link).is_file(), f"README.md links to {link}, which does not exist"
    assert "make run" in readme and "make test" in readme and "make docs" in readme
