"""A smoke run never writes into a user's data folder.

``debug=fast`` used to set ``data.synthetic.n_patients``, which turned a real data config's
``synthetic: null`` into a synthetic config: the run generated a synthetic set (images, splits,
info.json, a lock file beside the root) into the user's folder, or stopped with FileExistsError
when a ``.jsonl`` was already there.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (and beside it: a lock file) with its content's hash."""
    files = [p for p in root.parent.rglob("*") if p.is_file()]
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_debug_fast_on_a_real_data_config_leaves_the_data_folder_byte_identical(synthetic_dir, tmp_path):
    data = tmp_path / "user" / "mau"
    shutil.copytree(synthetic_dir, data)
    before = tree(data)
    cmd = [
        sys.executable,
        "-m",
        "unveil.train",
        "debug=fast",
        "data=mau_jsonl",
        f"data.root={data}",
        "data.num_workers=0",
        "trainer.max_steps=1",
        "eval.enabled=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.data_dir={tmp_path / 'cache_data'}",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**_env(), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert tree(data) == before
    assert (tmp_path / "run" / "backbone").exists()  # it did train, on the user's records


def _env() -> dict:
    import os

    return {**os.environ, "WANDB_MODE": "offline"}


def test_a_data_set_without_a_test_split_ends_with_metrics_json(synthetic_dir, make_cfg, tmp_path, caplog):
    """MMedPO's and STLLaVA-Med's released DPO data are training pairs only (data.splits.test: null):
    the run used to crash after training with KeyError: 'test', before writing metrics.json."""
    import json

    from unveil.train import train

    cfg = make_cfg(
        "debug=fast",
        "data=mau_jsonl",
        f"data.root={synthetic_dir}",
        "data.splits.test=null",
        "data.num_workers=0",
        "trainer.max_steps=1",
    )
    with caplog.at_level("WARNING", logger="unveil.train"):
        metrics = train(cfg)
    assert "no test split" in caplog.text and "train/loss" in metrics
    assert "train/loss" in json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_dpo_says_when_it_ignores_the_pair_weights_it_loaded(synthetic_dir, tmp_path, caplog):
    from test_backbones import write_preference_set

    from unveil.data.adapters import mau_jsonl
    from unveil.stages.dpo import DPOModule

    write_preference_set(synthetic_dir, tmp_path / "pref")
    pairs = mau_jsonl.read(tmp_path / "pref" / "train.jsonl")
    for i, s in enumerate(pairs):
        s.weight = 0.5 + 0.1 * i  # MMedPO's clinical-relevance scores
    dm = type("DM", (), {"data": {"train": pairs, "val": pairs}})()
    for norm, warned in (("none", True), ("raw", False)):
        module = DPOModule(_tiny(), weight_norm=norm)
        module._trainer = type("T", (), {"datamodule": dm})()
        caplog.clear()
        with caplog.at_level("WARNING", logger="unveil.stages.dpo"):
            module.setup("fit")
        assert ("stage.weight_norm=none ignores them" in caplog.text) == warned


def _tiny():
    from conftest import compose

    from unveil.models.factory import build_backbone

    c = compose(["debug=fast"])
    return build_backbone(c.model, peft=c.peft, corpus=["a nodule at [1, 2, 3, 4]"] * 4, cache_dir=c.paths.cache_dir)
