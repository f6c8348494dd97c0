"""Results prose cannot go stale silently: the "## Reading" of a committed table quotes only decimals the
regenerated part writes, and a regeneration whose tables no longer hold a quoted number marks the kept
reading as stale (unveil.report.tables)."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, load_experiment

from unveil.report.tables import reading_lines, stale_numbers

TABLES = ["umed_ablation.md", "mmedpo_ablation.md", "sft2400/umed_ablation.md"]


@pytest.mark.parametrize("name", TABLES)
def test_committed_readings_quote_only_numbers_their_tables_write(name):
    generated, reading = (ROOT / "experiments" / "results" / name).read_text().split("\n## Reading\n", 1)
    assert reading.strip()
    assert stale_numbers(reading, generated) == []


def test_stale_numbers_finds_what_the_tables_do_not_hold():
    tables = "| PPO | 0.710 ± 0.003 | -0.004 |"
    assert stale_numbers("PPO 0.710 ± 0.003, down 0.004; SFT 0.714 in 2 of 3 seeds", tables) == ["0.714"]
    assert stale_numbers("falls by \u22120.004", tables) == []
    lines = reading_lines("SFT was 0.714.", tables)
    assert lines[2].startswith("> **Stale:**") and "0.714" in lines[2] and lines[-2] == "SFT was 0.714."
    assert reading_lines("PPO 0.710.", tables) == ["## Reading", "", "PPO 0.710.", ""]


def test_regenerating_a_table_marks_a_reading_whose_numbers_it_no_longer_holds(tmp_path):
    abl = load_experiment("mmedpo_ablation")
    out, sft = tmp_path / "abl", tmp_path / "abl" / "sft_test"
    sft.mkdir(parents=True)
    (sft / "metrics.json").write_text(json.dumps({"test/invented_box_rate": 0.4, "test/iou": 0.3}))
    run = out / "dpo" / "dpo" / "seed0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\nstage:\n  weight_norm: none\ndata:\n  root: /x\n")
    (run / "metrics.json").write_text(json.dumps({"test/invented_box_rate": 0.1, "test/iou": 0.25}))
    md = tmp_path / "r.md"
    md.write_text("# old\n\n## Reading\n\nDPO takes invented boxes from 0.400 to 0.100.\n")
    abl.collect(out, sft, ["cmd"], md, tmp_path / "r.csv", "note")
    assert "> **Stale:**" not in md.read_text()  # every number is in the new tables
    md.write_text("# old\n\n## Reading\n\nDPO takes invented boxes from 0.400 to 0.050.\n")
    abl.collect(out, sft, ["cmd"], md, tmp_path / "r.csv", "note")
    text = md.read_text()
    assert "> **Stale:** this reading was written for other tables: it quotes 0.050" in text
    assert text.rstrip().endswith("from 0.400 to 0.050.")  # kept, not deleted: a person rewrites it
