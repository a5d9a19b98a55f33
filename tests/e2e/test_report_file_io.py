"""REPORT.md's File I/O section and headline, from the committed results; measures nothing.

``benchmarks.report`` is run on copies of the committed ``csi.json``, ``datapath.json``,
``DATAPATH.md`` and ``fio.json`` (the fio run's date shifted where a test needs it
newer), so these tests check what the report makes of the data path without running
a benchmark. The report's other sections are checked by ``test_csi_bench_smoke``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks import report

COMMITTED = report.RESULTS


def _results(tmp_path: Path, *names: str, fio_date: str | None = None) -> Path:
    """A results directory with copies of the named committed files."""
    results = tmp_path / "results"
    results.mkdir()
    for name in names:
        shutil.copy(COMMITTED / name, results / name)
    if fio_date is not None:
        fio = json.loads((results / "fio.json").read_text())
        fio["machine"]["date"] = fio_date
        (results / "fio.json").write_text(json.dumps(fio))
    return results


def _write(results: Path, tmp_path: Path) -> tuple[str, str, str]:
    """The report's text before its first section, its File I/O section, and all of it."""
    out = tmp_path / "report" / "REPORT.md"
    report.write_report(results, COMMITTED / "csi.json", out)
    text = out.read_text()
    assert "\n## File I/O\n" in text, "the File I/O section is missing"
    section = text.split("\n## File I/O\n", 1)[1].split("\n## ", 1)[0]
    return text.split("\n## ", 1)[0], section, text


def _committed(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((COMMITTED / name).read_text())
    return data


def test_data_path_table_every_row_with_its_source(tmp_path: Path) -> None:
    results = _results(tmp_path, "datapath.json", "DATAPATH.md")
    head, section, _ = _write(results, tmp_path)
    datapath = _committed("datapath.json")
    m = datapath["machine"]
    assert f"`datapath.json` ({datapath['mode']} run of {m['date']}" in section
    assert f"load avg {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f}" in section
    assert f"`{datapath['versions']['fusedrive_commit']}`" in section
    # The link resolves from where the report is to the DATAPATH.md beside datapath.json.
    link = section.split("](", 1)[1].split(")", 1)[0]
    assert link.endswith("DATAPATH.md")
    assert (tmp_path / "report" / link).resolve() == (results / "DATAPATH.md").resolve()
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0] == "| row | fusedrive | plain | ratio | goal | met |"
    body = table[2:]
    assert len(body) == len(datapath["rows"])
    for line, row in zip(body, datapath["rows"], strict=True):
        assert line.startswith(f"| {row['name']} | ")
        assert line.endswith("| met |" if row["met"] else "| **missed** |"), line
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(row.get("trial_ratios", [])) > 1:  # the ratio carries the per-trial range
            assert "(" in cells[3] and "-" in cells[3], line
        assert cells[4].startswith(row["comparison"]), line
    met = len(datapath["rows"]) - len(datapath["missed"])
    summary = f"**{met} of {len(datapath['rows'])} goals"
    assert summary in section
    # The headline names the data path's result and points to the section.
    assert summary in head and "(#file-io)" in head and m["date"] in head
    assert "| job |" not in section  # no fio.json in this results directory


def test_an_older_fio_run_is_named_with_its_date_not_tabled(tmp_path: Path) -> None:
    results = _results(tmp_path, "datapath.json", "fio.json", fio_date="2000-01-01T00:00:00+00:00")
    _, section, _ = _write(results, tmp_path)
    assert "fio_bench run of 2000-01-01T00:00:00+00:00) is older and not shown" in section
    assert "| job |" not in section and "| pgbench TPS |" in section


def test_a_newer_fio_run_is_tabled_after_the_data_path(tmp_path: Path) -> None:
    results = _results(tmp_path, "datapath.json", "fio.json", fio_date="2100-01-01T00:00:00+00:00")
    _, section, _ = _write(results, tmp_path)
    assert "is older and not shown" not in section
    assert "### A newer fio_bench run" in section
    fio_part = section.split("### A newer fio_bench run", 1)[1]
    assert "run of 2100-01-01T00:00:00+00:00" in fio_part and "| job |" in fio_part
    assert "| pgbench TPS |" in section.split("### A newer fio_bench run", 1)[0]
    # Without DATAPATH.md beside the json, no link to it.
    assert "DATAPATH.md" not in section


def test_without_datapath_json_the_fio_table_and_no_headline_sentence(tmp_path: Path) -> None:
    head, section, _ = _write(_results(tmp_path, "fio.json"), tmp_path)
    fio = _committed("fio.json")
    assert f"From `fio.json` ({fio['mode']} run of {fio['machine']['date']}" in section
    assert "| job |" in section and "datapath.json" not in section
    assert "(#file-io)" not in head


def test_without_either_the_report_says_what_it_lacks(tmp_path: Path) -> None:
    head, section, _ = _write(_results(tmp_path), tmp_path)
    assert "`fio.json` is missing" in section and "(#file-io)" not in head
