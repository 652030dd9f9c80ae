"""MkDocs hook: the settings reference is generated from `proxy.app.config.SETTINGS`.

docs/reference/settings.md holds a marker where the tables go; at build time this hook
replaces it with one table per group of settings (flag, environment variable, TOML key,
default, meaning, SIGHUP), read from the same table that makes the flags, the variables and
the TOML keys. Nothing of it is kept by hand, so a setting added to the code is documented by
the next build, and `tests/docs/test_docs.py` checks that every setting is on the built page.

Registered in mkdocs.yml under `hooks:`; this directory is excluded from the site.
"""

from __future__ import annotations

from typing import Any

from mkdocs.exceptions import PluginError

from proxy.app.config import SETTINGS, Setting

SETTINGS_PAGE = "reference/settings.md"
MARKER = "<!-- settings-table -->"

# Section titles, in the order of `grpc-etcd-proxy serve --help`; a group the code gains
# later is still rendered, under its own name, after these.
GROUP_TITLES = {
    "serve": "What to serve",
    "etcd": "etcd",
    "balancing": "Balancing",
    "tls": "TLS (listener and backends)",
    "limits": "Client connection limits",
    "grpc_web": "gRPC-Web",
    "resilience": "Retries, outlier detection and health checks",
    "operations": "Operations (admin endpoint, logs, drain, workers)",
}

NONE = "—"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != SETTINGS_PAGE:
        return markdown
    if MARKER not in markdown:
        # Without the marker the page would silently lose its table.
        raise PluginError(f"{SETTINGS_PAGE}: no {MARKER} marker for the settings table")
    return markdown.replace(MARKER, render_tables(SETTINGS))


def render_tables(settings: tuple[Setting, ...]) -> str:
    groups: dict[str, list[Setting]] = {name: [] for name in GROUP_TITLES}
    for setting in settings:
        groups.setdefault(setting.group, []).append(setting)
    parts = []
    for group, members in groups.items():
        if not members:
            continue
        parts.append(f"### {GROUP_TITLES.get(group, group)}\n")
        parts.append(render_table(members))
    return "\n".join(parts)


def render_table(settings: list[Setting]) -> str:
    rows = [
        "| Flag | Environment variable | TOML key | Default | Meaning | SIGHUP |",
        "|---|---|---|---|---|---|",
    ]
    for s in settings:
        cells = (flag_cell(s), env_cell(s), toml_cell(s), default_cell(s), meaning(s), sighup(s))
        rows.append("| " + " | ".join(cell.replace("\n", " ") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def flag_cell(s: Setting) -> str:
    # The id lets other pages link to one setting: settings.md#setting-drain_timeout.
    anchor = f'<span id="setting-{s.name}"></span>'
    if not s.in_flags:
        return anchor + NONE
    if s.kind == "bool":
        return anchor + f"`{s.flag}`, `--no-{s.flag[2:]}`"
    return anchor + (f"`{s.flag} {s.metavar}`" if s.metavar else f"`{s.flag}`")


def env_cell(s: Setting) -> str:
    return f"`{s.env}`" if s.in_flags else NONE


def toml_cell(s: Setting) -> str:
    if not s.in_file:
        return NONE
    if s.kind == "targets":
        return f"`[{s.name}.NAME]` (tables)"
    return f"`{s.name}`"


def default_cell(s: Setting) -> str:
    if s.shown_default is not None:
        shown = s.shown_default
        # A value (`127.0.0.1:9901`, `''`) in code; a phrase ("the system store") as text.
        return shown if " " in shown else f"`{shown}`"
    default = s.default
    if default is None or default == ():
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    if isinstance(default, int | float):
        return str(default)
    return f"`{default}`"


def meaning(s: Setting) -> str:
    # Verbatim, as `serve --help` shows it (lower case: "etcd" must not become "Etcd").
    return escape_pipes(s.help.strip())


def escape_pipes(text: str) -> str:
    """A `|` outside a code span would split the table cell; inside one it is safe (and an
    escape would show)."""
    pieces = text.split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(pieces))


def sighup(s: Setting) -> str:
    if not s.reloadable:
        return ""
    # Certificate, key and CA files are read again on every SIGHUP, changed or not.
    return "yes (file re-read)" if s.metavar == "FILE" else "yes"
