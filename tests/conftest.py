"""Shared fixtures: a small synthetic data set on disk and composed Hydra configs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and CI's two cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    from unveil.data.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(n_patients=24, seed=3), tmp_path_factory.mktemp("syn"), progress=False)


def compose(overrides: list[str] | None = None, config_name: str = "train", tmp: Path | None = None):
    """Compose the real config (as the CLI would) with test-sized overrides."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    import unveil.utils.resolvers  # noqa: F401

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hcompose(config_name=config_name, overrides=overrides or [], return_hydra_config=True)
    if tmp is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp / "run")
            cfg.paths.data_dir = str(tmp / "data")
            cfg.paths.cache_dir = str(tmp / "cache")
            cfg.paths.log_dir = str(tmp / "logs")
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # a task function never sees the hydra node
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str, config_name: str = "train"):
        return compose(list(overrides), config_name=config_name, tmp=tmp_path)

    return _make


def load_experiment(name: str):
    """Import ``experiments/<name>.py`` (a script folder, not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # as importlib's recipe: dataclasses resolve their string annotations through it
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def debug_sweep(tmp_path_factory) -> Path:
    """A small ablation as the CLI makes it (``.hydra/overrides.yaml`` in every run dir): an SFT run
    (``sft/``), then a GRPO multirun with LoRA from it over two seeds (``rl/0``, ``rl/1``), all
    ``debug=fast``. Shared by the report, notebook and export tests; about 20 s on two cores."""
    import subprocess

    root = tmp_path_factory.mktemp("sweep_root")
    (root / "conf").symlink_to(CONF)  # UNVEIL_ROOT moves data/logs/cache out of the checkout
    env = {**os.environ, "UNVEIL_ROOT": str(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    sweep = root / "sweep"
    py = [sys.executable, "-m", "unveil.train"]
    cmds = [
        py + ["debug=fast", f"hydra.run.dir={sweep / 'sft'}"],
        py
        + [
            "-m",
            "debug=fast",
            "stage=grpo",
            "peft=lora",
            f"model.init_from={sweep / 'sft'}",
            "reward=umed",
            "seed=0,1",
            "stage.log_completions_every=1",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            f"hydra.sweep.dir={sweep / 'rl'}",
        ],
    ]
    for cmd in cmds:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    return sweep


def execute_notebook(path: Path, env: dict[str, str], extra: str | None = None, timeout: int = 300):
    """Run a notebook top to bottom in a real Jupyter kernel (nbclient + ipykernel, this interpreter),
    in the repository root with ``env`` added to the environment; ``extra`` is a code cell appended
    (e.g. printing what a test checks). Returns the executed notebook; a failing cell raises
    ``nbclient.exceptions.CellExecutionError`` with its traceback."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if extra:
        nb.cells.append(nbformat.v4.new_code_cell(extra))
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(ROOT)}})
    client.execute(env={**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline", **env})
    return nb


def notebook_outputs(nb) -> tuple[str, int]:
    """(the text every cell printed or displayed, the number of images displayed)."""
    text, images = [], 0
    for c in nb.cells:
        for o in c.get("outputs", []):
            text.append(o.get("text", "") if o.get("output_type") == "stream" else "")
            data = o.get("data", {})
            text.append(data.get("text/plain", ""))
            images += "image/png" in data
    return "\n".join(text), images
