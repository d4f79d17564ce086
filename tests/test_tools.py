"""The benchmark entry point (`python -m tools.bench`): every subcommand parses and explains
itself, the GPU-only one stops with a message on a CPU, and the shared report writes its
JSON and markdown as rows come."""

from __future__ import annotations

import json

import jax
import pytest

from tools.bench.__main__ import SUBCOMMANDS, main
from tools.bench.harness import Column, Report, median_time


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m tools.bench {name}" in out and "--json" in out and "--markdown" in out


def test_unknown_subcommand_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the message on a machine without a GPU")
def test_gpu_only_subcommand_says_so_on_cpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["ncu"])


def test_report_writes_json_and_markdown_rows(tmp_path, capsys):
    json_path, md_path = tmp_path / "r.json", tmp_path / "rows.md"
    report = Report((Column("impl", "impl"), Column("ms", "ms", "{:.3f}")), str(json_path), str(md_path), shape="tiny")
    report.row(impl="xla", ms=1.23456)
    assert json.loads(json_path.read_text())["results"] == [{"impl": "xla", "ms": 1.23456}]  # written at once
    report.row(impl="pallas", ms=None)
    report.add("check", {"o": 1e-3})
    data = json.loads(json_path.read_text())
    assert data["header"]["shape"] == "tiny" and data["check"] == {"o": 1e-3} and len(data["results"]) == 2
    for key in ("command", "device", "jax", "commit", "date"):
        assert data["header"][key], key
    lines = md_path.read_text().splitlines()
    assert lines[1].startswith("`python -m tools.bench") and data["header"]["commit"] in lines[1]
    assert lines[3:] == ["| impl | ms |", "|---|---|", "| xla | 1.235 |", "| pallas |  |"]


def test_median_time_synchronises_once_per_sample():
    calls, syncs = [], []
    seconds = median_time(lambda: calls.append(1), samples=3, warmup=1, max_reps=4, sample_seconds=10,
                          sync=lambda out: syncs.append(out))
    assert seconds >= 0 and len(syncs) == 1 + 1 + 3  # warm-up, the probe call, one per sample
    assert len(calls) == 1 + 1 + 3 * 4  # each sample: max_reps back-to-back calls (they are fast)
