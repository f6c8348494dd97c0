"""wandb in a sweep (``logger=wandb``, offline, a temporary WANDB_DIR, no network).

Every job of a multirun is its own wandb run, in one group per sweep, with the stage as its job type,
finished when the job ends (exit code 1 when it failed), so the next job in the same process (the basic
launcher, joblib's reused workers) does not log into it; RL runs log the completions table; a report's
files go to the sweep's group as one more run. The offline runs are read back from their ``.wandb``
record files.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from conftest import compose
from test_launchers import TINY

from unveil.stages.guard import NonFiniteError


def wandb_records(path: Path):
    """The records of an offline run's ``run-<id>.wandb`` (wandb's LevelDB-style log: 32 KiB blocks,
    each record a 7-byte header, checksum / length / kind, then its bytes, split across blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 2):  # full, first
            buf = chunk
        elif kind in (3, 4):  # middle, last
            buf += chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            yield r


def _read_run(f: Path) -> dict:
    info = {"dir": f.parent, "exit": None}
    for r in wandb_records(f):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            info.update(id=r.run.run_id, group=r.run.run_group, job_type=r.run.job_type, name=r.run.display_name)
        elif kind == "exit":
            info["exit"] = r.exit.exit_code
    return info


def offline_runs(save_dir: Path, wait_s: float = 30.0) -> list[dict]:
    """Each offline run under ``save_dir/wandb``: its id, group, job type, name and exit code. wandb's
    service writes the record file behind ``finish()``, so this waits (at most ``wait_s``) for each
    file to hold its exit record; a run never finished comes back with ``exit: None``."""
    runs = []
    for f in sorted(save_dir.glob("wandb/offline-run-*/run-*.wandb")):
        deadline = time.monotonic() + wait_s
        while (info := _read_run(f))["exit"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
        runs.append(info)
    return runs


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    import wandb

    wandb.finish()  # nothing left open for the next test, whatever failed


def test_each_job_of_a_sweep_is_its_own_finished_run_in_the_sweeps_group(tmp_path, offline_wandb):
    import wandb

    from unveil.train import train
    from unveil.utils.wandb_run import group_of

    sweep, data = tmp_path / "sweep", tmp_path / "data"
    jobs = [
        ["seed=0"],
        [
            "stage=grpo",
            "reward=umed",
            "stage.num_generations=2",
            "stage.max_new_tokens=8",
            "stage.log_completions_every=1",
        ],
        ["stage.optim.lr=1e30", "trainer.max_steps=6"],  # meets NaN: the job fails
    ]
    for num, extra in enumerate(jobs):
        cfg = compose(
            [*TINY, "logger=wandb", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep}", f"hydra.job.num={num}",
             f"paths.output_dir={sweep / str(num)}", f"paths.data_dir={data}", f"paths.cache_dir={tmp_path / 'cache'}",
             *extra]
        )  # fmt: skip
        if num < 2:
            train(cfg)
        else:
            with pytest.raises(NonFiniteError):
                train(cfg)
        assert wandb.run is None  # finished at the end of the job, failed or not
    runs = [offline_runs(sweep / str(n)) for n in range(3)]
    assert [len(r) for r in runs] == [1, 1, 1]
    (sft,), (grpo,), (failed,) = runs
    assert len({sft["id"], grpo["id"], failed["id"]}) == 3
    assert {r["group"] for r in (sft, grpo, failed)} == {group_of(sweep)} == {f"{tmp_path.name}/sweep"}
    assert (sft["job_type"], grpo["job_type"], failed["job_type"]) == ("sft", "grpo", "sft")
    assert (sft["name"], grpo["name"], failed["name"]) == ("train#0", "train#1", "train#2")
    assert (sft["exit"], grpo["exit"], failed["exit"]) == (0, 0, 1)
    tables = sorted((grpo["dir"] / "files" / "media" / "table").glob("completions_*.table.json"))
    assert tables, "the GRPO run logged no completions table"
    table = json.loads(tables[0].read_text())
    assert {"completion", "reward", "rewards/localization", "rewards/vision_relevance"} <= set(table["columns"])
    assert table["data"]


def test_a_single_run_has_no_group_and_the_stage_as_its_job_type():
    cfg = compose(["logger=wandb", "stage=dpo"])
    assert cfg.logger.wandb.group is None
    assert cfg.logger.wandb.name == "train" and cfg.logger.wandb.job_type == "dpo"


def test_a_report_goes_to_the_sweeps_group_as_a_finished_report_run(tmp_path, offline_wandb):
    from PIL import Image

    from unveil.utils.wandb_run import group_of, log_report_to_wandb

    report = tmp_path / "report"
    report.mkdir()
    Image.new("RGB", (8, 8), "red").save(report / "iou_by_group.png")
    (report / "report.csv").write_text("group,test/iou\nsft,0.7\ngrpo,0.71\n")
    (report / "report.md").write_text("| group | iou |\n")
    group = group_of(tmp_path / "sweep")
    run_id = log_report_to_wandb(sorted(report.iterdir()), group=group)
    (run,) = offline_runs(report)
    assert (run["id"], run["group"], run["job_type"], run["exit"]) == (run_id, group, "report", 0)
    files = run["dir"] / "files"
    assert list((files / "media" / "images").glob("iou_by_group_*.png"))
    table = next((files / "media" / "table").glob("report_*.table.json"))
    assert json.loads(table.read_text())["data"] == [["sft", 0.7], ["grpo", 0.71]]  # numbers as numbers
    assert (files / "report.md").exists()
    with pytest.raises(FileNotFoundError, match="missing.png"):
        log_report_to_wandb([report / "missing.png"], group=group)
