"""Every option of every config group composes; multirun works from the command line."""

import json
import os
import subprocess
import sys

import pytest
from conftest import CONF, ROOT, compose

# Options that need a value the user must supply (a data root, a checkpoint to start from).
REQUIRED = {
    ("data", "mau_jsonl"): ["data.root=/tmp/x"],
    ("data", "llava"): ["data.root=/tmp/x"],
    ("data", "med_mim"): ["data.root=/tmp/x"],
    ("data", "vqa_table"): ["data.root=/tmp/x"],
    ("data", "mmedpo"): ["data.root=/tmp/x"],
    ("data", "stllava_dpo"): ["data.root=/tmp/x"],
    ("model", "hf"): ["model.name_or_path=/tmp/x"],
    ("experiment", "umed_ppo"): ["model.init_from=/tmp/x"],
    ("experiment", "umed_grpo"): ["model.init_from=/tmp/x"],
    ("experiment", "mmedpo_dpo"): ["model.init_from=/tmp/x", "data.root=/tmp/x"],
    ("experiment", "stllava_dpo"): ["model.init_from=/tmp/x", "data.root=/tmp/x"],
    ("experiment", "stllava_sft"): ["data.root=/tmp/x"],
}
TRAIN_GROUPS = [
    "data",
    "model",
    "peft",
    "stage",
    "reward",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "experiment",
    "debug",
]


def options(group: str) -> list[str]:
    # a leading underscore marks a shared base another option includes (experiment/_umed_rl), not an option
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group", TRAIN_GROUPS)
def test_every_option_composes(group):
    from omegaconf import OmegaConf

    for opt in options(group):
        extra = REQUIRED.get((group, opt), [])
        cfg = compose([f"{group}={opt}", *extra])
        # resolve everything except values the user must still supply (???)
        container = OmegaConf.to_container(cfg, resolve=False)
        assert container, (group, opt)
        for key in ("data", "model", "stage", "trainer"):
            OmegaConf.to_container(cfg[key], resolve=True, throw_on_missing=False)


def test_eval_and_curate_configs_compose():
    assert compose(["ckpt_path=/tmp/x"], config_name="eval").split == "test"
    for b in options("builder"):
        compose([f"builder={b}"], config_name="curate")


def test_experiment_overrides_only_what_differs():
    base = compose([])
    exp = compose(["experiment=umed_sft"])
    from omegaconf import OmegaConf

    b, e = OmegaConf.to_container(base, resolve=False), OmegaConf.to_container(exp, resolve=False)
    changed = {k for k in e if e[k] != b.get(k)}
    # + the paper preset and the deviations the run logs (docs/fidelity.md), which change no setting
    assert changed <= {"task_name", "tags", "trainer", "paper", "deviations"}, changed
    assert exp.trainer.max_steps != base.trainer.max_steps


def test_secrets_never_enter_the_logged_config(monkeypatch):
    from omegaconf import OmegaConf

    from unveil.utils.secrets import scrub

    monkeypatch.setenv("WANDB_API_KEY", "sk-very-secret")
    cfg = compose(["logger=wandb"])
    assert cfg.logger.wandb.offline is False  # key present -> online
    logged = json.dumps(scrub(OmegaConf.to_container(cfg, resolve=True)))
    assert "sk-very-secret" not in logged
    assert scrub({"judge": {"api_key": "abc", "api_key_env": "OPENAI_API_KEY"}}) == {
        "judge": {"api_key": "***", "api_key_env": "OPENAI_API_KEY"}
    }
    monkeypatch.delenv("WANDB_API_KEY")
    assert compose(["logger=wandb"]).logger.wandb.offline is True


def test_multirun_in_a_subprocess(tmp_path):
    env = {**os.environ, "UNVEIL_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    (tmp_path / "conf").symlink_to(CONF)  # UNVEIL_ROOT only moves data/logs/cache
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "unveil.train", "-m", "debug=fast", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").exists())
    assert [p.name for p in runs] == ["0", "1"]
    for p in runs:
        m = json.loads((p / "metrics.json").read_text())
        assert "test/presence_acc" in m and (p / "predictions.jsonl").exists()
        assert (p / ".hydra" / "config.yaml").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage.optim.scheduler=bogus", r"scheduler='bogus'; expected one of cosine, linear, constant"),
        ("+stage.optim.lrr=1e-4", r"unknown key\(s\) \['lrr'\].*\n  lr: peak learning rate"),
        (
            "model._target_=unveil.models.factory.tiny_lava",
            r"model._target_='unveil.models.factory.tiny_lava' names nothing.*model=tiny_llava "
            r"\(unveil.models.factory.tiny_llava\)",
        ),
        ("+data.batchsize=4", r"data: unknown key\(s\) \['batchsize'\].*valid keys: .*batch_size"),
        ("+data.adapter.imagedir=x", r"data.adapter: unknown key\(s\) \['imagedir'\].*mau_jsonl.read"),
        ("peft=lora +peft.rr=4", r"peft: unknown key\(s\) \['rr'\] for peft.tuners.lora.config.LoraConfig"),
        ("+stage.num_generation=4", r"stage: unknown key\(s\) \['num_generation'\]"),
        (
            "stage=grpo reward=umed +reward.localization.iou_mode=giou",
            r"reward.localization: unknown key\(s\) \['iou_mode'\]",
        ),
        ("stage._target_=unveil.stages.grpo.GRPOModul", r"stage._target_=.*names nothing.*stage=grpo"),
    ],
)
def test_an_unknown_component_key_optimiser_key_or_scheduler_fails_before_any_work(
    make_cfg, tmp_path, override, message
):
    """Before: the scheduler silently became linear decay, a misspelt key was ignored."""
    from unveil.train import train

    with pytest.raises(ValueError, match=message):
        train(make_cfg("debug=fast", *override.split()))
    assert not (tmp_path / "data").exists()  # no data generated, no model built


def test_a_resume_with_another_schedule_warns(make_cfg, tmp_path, caplog):
    from unveil.train import train

    train(make_cfg("debug=fast", "trainer.max_steps=4", "eval.enabled=false"))
    with caplog.at_level("WARNING", logger="unveil.stages.base"):
        train(make_cfg("debug=fast", "trainer.max_steps=4", "eval.enabled=false", "ckpt_path=last"))
    assert "another learning-rate schedule" not in caplog.text  # the same schedule: nothing to say
    with caplog.at_level("WARNING", logger="unveil.stages.base"):
        train(make_cfg("debug=fast", "trainer.max_steps=7", "eval.enabled=false", "ckpt_path=last"))
    assert "another learning-rate schedule" in caplog.text and "'total': 4" in caplog.text


def test_a_run_config_of_the_registry_era_reads_as_the_current_one():
    """`python -m unveil.eval <old run>`: model.kind, peft.kind, data.format/adapter_kwargs and
    synthetic.kind (before one plug-in mechanism) become the `_target_`s the current config has."""
    from omegaconf import OmegaConf, open_dict

    from unveil.eval.old_configs import upgrade

    now = compose(["debug=fast", "peft=lora", "peft.r=4", "peft.lora_alpha=8", "data=synthetic_mim"])
    old = now.copy()
    with open_dict(old):
        old.model.kind = old.model.pop("_target_").rsplit(".", 1)[1]
        old.peft = {"kind": "lora", "r": 4, "alpha": 8, "dropout": now.peft.lora_dropout}
        old.peft.target_modules, old.peft.modules_to_save = now.peft.target_modules, []
        old.data._target_ = "unveil.data.datamodule.UnveilDataModule"
        old.data.format, old.data.adapter_kwargs = "mau_jsonl", {}
        del old.data.adapter
        old.data.synthetic.kind = "multi_image"
        del old.data.synthetic._target_
    got = upgrade(old)
    for group in ("model", "peft", "data"):
        assert OmegaConf.to_container(got[group]) == OmegaConf.to_container(now[group]), group
    assert upgrade(now) == now  # a current config passes through
