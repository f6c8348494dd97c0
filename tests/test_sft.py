"""The SFT stage end to end on the synthetic data: loss falls, outputs land, resume and eval work."""

import json

import pytest
import torch
from omegaconf import open_dict

from unveil.eval import evaluate as ev


def test_sft_loss_falls_and_run_outputs(make_cfg, tmp_path):
    from unveil.train import train

    cfg = make_cfg(
        "debug=fast",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "stage.optim.warmup_steps=5",
        "data.batch_size=8",
        "data.synthetic.n_patients=40",
    )
    metrics = train(cfg)
    out = tmp_path / "run"
    rows = [l.split(",") for l in (out / "csv" / "metrics.csv").read_text().splitlines()]
    col = rows[0].index("train/loss")
    losses = [float(r[col]) for r in rows[1:] if len(r) > col and r[col]]
    assert len(losses) >= 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test/presence_acc"] == pytest.approx(metrics["test/presence_acc"])
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert preds and {"id", "prediction", "reference", "task"} <= set(preds[0])
    assert (out / "backbone" / "config.json").exists() and (out / "checkpoints" / "last.ckpt").exists()


def test_resume_and_eval_from_checkpoint(make_cfg, tmp_path):
    from unveil.eval import load_for_eval
    from unveil.train import train

    cfg = make_cfg("debug=fast", "trainer.max_steps=4", "trainer.val_check_interval=2")
    train(cfg)
    out = tmp_path / "run"
    (out / ".hydra").mkdir(exist_ok=True)
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    ckpt = out / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # loadable without pickled code
    assert state["global_step"] == 4
    # resume: continues from step 4 to 6
    with open_dict(cfg):
        cfg.ckpt_path = str(ckpt)
        cfg.trainer.max_steps = 6
        cfg.paths.output_dir = str(tmp_path / "resumed")
    train(cfg)
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    # evaluation from the .ckpt and from the run dir give the same predictions as the run's own model
    bb_ckpt, dm = load_for_eval(ckpt)
    bb_dir, _ = load_for_eval(out)
    samples = dm.data["test"][:4]
    a = ev.evaluate(bb_ckpt, samples, None, progress=False)
    b = ev.evaluate(bb_dir, samples, None, progress=False)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)  # NaN (no such samples) on both
