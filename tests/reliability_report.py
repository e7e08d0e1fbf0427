"""pytest plugin: collect one row per reliability test and print them as one table.

Loaded by ``make reliability`` (``pytest -q -m reliability -p tests.reliability_report``). Each
test in ``tests/reliability/`` records its row through the ``reliability_row`` fixture
(``tests/reliability/conftest.py``): ``(row name, faults injected, faults survived, figure)``.
Rows sharing a name are merged (counts summed, figures joined). The plugin adds the test outcome,
prints the table in the terminal summary and writes it as Markdown to
``$KFAC_RELIABILITY_OUT`` (default ``reliability_results.md`` in the rootdir).
"""

from __future__ import annotations

import os
import pathlib
import platform
from dataclasses import dataclass, field

import pytest

# the fault list's row order; rows with other names follow in the order they were recorded
ORDER = [
    "exactness oracle",
    "state round trip",
    "resume sweep",
    "fit twice, no leak",
    "eval is silent",
    "refit after validate/test",
    "add-K-FAC resume",
    "option change on resume",
    "state checks",
    "interrupted step",
    "non-finite gradients",
    "non-finite statistics, finite gradients",
    "decomposition failure",
    "ill-conditioning",
    "damping sweep",
    "mixed precision",
    "low-rank with penalties",
    "MC/empirical scale",
    "DDP identical ranks",
    "DDP fault on one rank",
    "gradient accumulation",
    "sharing and freezing",
    "wrapped optimizers",
    "Lightning matrix",
    "config fuzz",
    "memory soak",
]
ROWS_KEY = pytest.StashKey[list["Row"]]()
XFAIL_KEY = pytest.StashKey[list[str]]()
OUTCOMES_KEY = pytest.StashKey[dict[str, str]]()


@dataclass
class Row:
    """One recorded row; ``nodeid`` links it to the test outcome."""

    name: str
    injected: int
    survived: int
    figure: str
    nodeid: str
    order: int = field(default=0)


def record_row(config: pytest.Config, row: Row) -> None:
    """Append a row (used by the fixture; works whether or not this plugin is loaded)."""
    rows = config.stash.setdefault(ROWS_KEY, [])
    row.order = len(rows)
    rows.append(row)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[OUTCOMES_KEY] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    outcomes = item.config.stash.setdefault(OUTCOMES_KEY, {})
    if hasattr(report, "wasxfail") and report.skipped and item.get_closest_marker("reliability"):
        item.config.stash.setdefault(XFAIL_KEY, []).append(f"{item.nodeid}: {report.wasxfail}")
    if report.failed:
        outcomes[item.nodeid] = "FAIL"
    elif report.when == "call" and report.skipped:
        outcomes.setdefault(item.nodeid, "skip")
    elif report.when == "call" and report.passed:
        outcomes.setdefault(item.nodeid, "pass")


def merged_rows(config: pytest.Config) -> list[list[str]]:
    """Table body: one line per row name, in first-recorded order."""
    outcomes = config.stash.get(OUTCOMES_KEY, {})
    merged: dict[str, dict] = {}
    for row in config.stash.get(ROWS_KEY, []):
        entry = merged.setdefault(
            row.name,
            {"injected": 0, "survived": 0, "figures": [], "results": set(), "tests": set()},
        )
        entry["injected"] += row.injected
        entry["survived"] += row.survived
        if row.figure and row.figure not in entry["figures"]:
            entry["figures"].append(row.figure)
        entry["tests"].add(row.nodeid)
        entry["results"].add(outcomes.get(row.nodeid, "pass"))
    body = []
    rank = {name: i for i, name in enumerate(ORDER)}
    for name, e in sorted(merged.items(), key=lambda kv: rank.get(kv[0], len(ORDER))):
        result = "FAIL" if "FAIL" in e["results"] else "pass"
        body.append(
            [
                name,
                str(e["injected"]),
                str(e["survived"]),
                "; ".join(e["figures"]),
                f"{result} ({len(e['tests'])} test{'s' if len(e['tests']) > 1 else ''})",
            ]
        )
    return body


def format_table(body: list[list[str]]) -> str:
    """A Markdown table (aligned so it also reads well in a terminal)."""
    header = ["test", "faults injected", "faults survived", "figure", "result"]
    body = [[c.replace("|", "\\|") for c in r] for r in body]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rows = [line(header), "| " + " | ".join("-" * w for w in widths) + " |"]
    rows += [line(r) for r in body]
    return "\n".join(rows)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    body = merged_rows(config)
    if not body:
        return
    table = format_table(body)
    gaps = config.stash.get(XFAIL_KEY, [])
    if gaps:
        table += "\n\nKnown gaps (xfail):\n" + "\n".join(f"- {g}" for g in gaps)
    terminalreporter.section("reliability (fault injection)")
    terminalreporter.write_line(table)
    import torch

    out = pathlib.Path(
        os.environ.get(
            "KFAC_RELIABILITY_OUT", str(pathlib.Path(config.rootpath) / "reliability_results.md")
        )
    )
    args = " ".join(config.invocation_params.args)
    text = (
        f"# Reliability results\n\nCommand: `python -m pytest {args}` "
        f"(torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs)\n\n{table}\n"
    )
    out.write_text(text)
    terminalreporter.write_line(f"reliability table written to {out}")
