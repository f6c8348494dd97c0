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
