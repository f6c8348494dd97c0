"""Paper presets and logged deviations of the experiment files (unveil.utils.paper, docs/fidelity.md)."""

from __future__ import annotations

import logging

import pytest
from conftest import CONF, ROOT, compose
from omegaconf import OmegaConf

from unveil.stages.optim import OPTIM_KEYS
from unveil.utils.paper import apply_paper_preset, deviations

REAL_DATA = ["umed_sft", "umed_ppo", "umed_grpo", "mmedpo_dpo", "stllava_dpo", "stllava_sft", "mim_sft"]
NEEDS = {
    "umed_ppo": ["model.init_from=/tmp/x"],
    "umed_grpo": ["model.init_from=/tmp/x"],
    "mmedpo_dpo": ["model.init_from=/tmp/x", "data.root=/tmp/x"],
    "stllava_dpo": ["model.init_from=/tmp/x", "data.root=/tmp/x"],
    "stllava_sft": ["data.root=/tmp/x"],
}


def test_every_experiment_file_has_a_paper_block_and_deviations():
    names = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("_"))
    assert names == sorted(REAL_DATA)
    for name in names:
        cfg = compose([f"experiment={name}", *NEEDS.get(name, [])])
        assert cfg.paper.source and "values" in cfg.paper, name
        assert cfg.deviations, name
        for path in cfg.paper["values"]:  # every preset path names a setting the run has (no typo)
            known = path.startswith("stage.optim.") and path.rsplit(".", 1)[1] in OPTIM_KEYS
            assert known or OmegaConf.select(cfg, path, default="<absent>") != "<absent>", (name, path)


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("mmedpo_dpo", {"peft.r": 128, "peft.lora_alpha": 256, "stage.optim.lr": 1e-7, "trainer.max_epochs": 3}),
        ("stllava_dpo", {"peft.r": 128, "peft.lora_alpha": 256, "stage.optim.lr": 5e-6, "trainer.max_epochs": 1}),
        ("stllava_sft", {"peft.r": 128, "stage.optim.lr": 2e-4, "trainer.max_epochs": 3, "stage.sq_r": 0.5}),
        ("umed_ppo", {"stage.score_baseline": "none"}),
    ],
)
def test_the_preset_applies_on_a_real_backbone_only(name, want):
    tiny = compose([f"experiment={name}", *NEEDS.get(name, [])])
    before = OmegaConf.to_container(tiny, resolve=False)
    assert apply_paper_preset(tiny, given=set()) == {}
    assert OmegaConf.to_container(tiny, resolve=False) == before  # the tiny defaults stay as they are
    real = compose([f"experiment={name}", "model=llava_med", *NEEDS.get(name, [])])
    applied = apply_paper_preset(real, given=set())
    assert applied
    for path, value in want.items():
        assert OmegaConf.select(real, path) == value, path


def test_command_line_values_win_over_the_preset(caplog):
    cfg = compose(["experiment=mmedpo_dpo", "model=llava_med", "stage.optim.lr=3e-7", *NEEDS["mmedpo_dpo"]])
    with caplog.at_level(logging.WARNING, logger="unveil.train"):
        applied = apply_paper_preset(cfg, given={"stage.optim.lr"})
    assert "stage.optim.lr" not in applied and cfg.stage.optim.lr == 3e-7 and cfg.peft.r == 128
    assert "stage.optim.lr=3e-07 from the command line (the paper's: 1e-07)" in caplog.text


def test_deviations_follow_their_conditions():
    ppo = compose(["experiment=umed_ppo", *NEEDS["umed_ppo"]])
    found = deviations(ppo)
    assert any("PPO/RLOO hybrid" in d for d in found) and any("word-overlap judge" in d for d in found)
    assert not any("pad to square" in d for d in found)  # the tiny model: no llava-hf processor
    # not applied on the tiny model: the published values it does not use are named
    assert any("stage.score_baseline=group (paper: none)" in d for d in found)
    plain = compose(
        [
            "experiment=umed_ppo",
            "stage.score_baseline=none",
            "reward.relevance.judge={_target_: unveil.judges.base.OverlapJudge}",
        ]
    )
    found = deviations(plain)
    assert not any("PPO/RLOO hybrid" in d or "word-overlap judge" in d for d in found)
    real = compose(["experiment=mmedpo_dpo", "model=llava_med", *NEEDS["mmedpo_dpo"]])
    apply_paper_preset(real, given=set())
    found = deviations(real)
    assert not any("pad to square" in d for d in found) and not any("not applied" in d for d in found)  # padded
    native = compose(["experiment=mmedpo_dpo", "model=llava_med", "model.image_aspect=native", *NEEDS["mmedpo_dpo"]])
    apply_paper_preset(native, given=set())
    assert any("pad to square" in d for d in deviations(native))


def test_train_logs_each_deviation_at_run_start(tmp_path, caplog, monkeypatch):
    """train() warns each deviation before any work (stopped here at the config check that follows)."""
    import unveil.train

    def stop(_cfg):
        raise RuntimeError("stop here")

    monkeypatch.setattr(unveil.train, "check_config", stop)
    cfg = compose(["experiment=mmedpo_dpo", "model.init_from=/tmp/x", "data.root=/tmp/x"], tmp=tmp_path)
    with caplog.at_level(logging.WARNING, logger="unveil.train"), pytest.raises(RuntimeError, match="stop here"):
        unveil.train.train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("deviates from the paper")]
    assert len(lines) == len(deviations(cfg)) >= 4
    assert "deviates from the paper [mmedpo_dpo]: the pairs come from `unveil.curate builder=mmedpo`" in lines[0]
    assert any("peft.r=16 (paper: 128)" in x and "stage.optim.lr=0.0002 (paper: 1e-07)" in x for x in lines)


def test_fidelity_doc_is_linked():
    assert "docs/fidelity.md" in (ROOT / "README.md").read_text()
    assert "fidelity.md" in (ROOT / "docs" / "methods.md").read_text()
