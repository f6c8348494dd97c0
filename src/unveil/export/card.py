"""The model card (``README.md``) of an export: how the run was trained, its data, metrics and config."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

from omegaconf import OmegaConf

from unveil.export.weights import is_lora
from unveil.report.collect import ReportRun
from unveil.report.tables import fmt, md_table
from unveil.report.write import TRAINING

MARK = "Exported by `python -m unveil.export`"  # how a later --force knows this folder is an export


def _select(cfg, key: str):
    """A config value resolved where it can be on its own (``${oc.select:...}``, neighbouring keys),
    else as the run recorded it (paths of the machine it ran on, ``${hydra:...}``)."""
    import unveil.utils.resolvers  # noqa: F401  (the ${unveil.*} resolvers)

    try:
        v = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    except Exception:
        v = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        return OmegaConf.to_container(v, resolve=False) if OmegaConf.is_config(v) else v


def _front_matter(cfg, base: str | None, adapter_only: bool) -> list[str]:
    stage = str(_select(cfg, "stage._target_") or "").rsplit(".", 1)[-1].removesuffix("Module").lower()
    lines = ["---", f"library_name: {'peft' if adapter_only else 'transformers'}", "pipeline_tag: image-text-to-text"]
    if base and not Path(base).is_absolute():  # a hub id; a local path means nothing on the hub
        lines.append(f"base_model: {base}")
    return lines + ["tags:", "- unveil", "- medical", "- vision-language", f"- {stage or 'unknown-stage'}", "---"]


def _training(run: ReportRun, cfg, base: str | None, adapter_only: bool) -> list[str]:
    model = _select(cfg, "model") or {}
    peft = _select(cfg, "peft") or {}
    command = shlex.join(["python", "-m", "unveil.train", *(f"{k}={v}" for k, v in run.overrides.items())])
    rows = [
        ["stage", f"`{_select(cfg, 'stage._target_')}`"],
        [
            "model",
            f"`model._target_={model.get('_target_')}`"
            + (f", `{model['name_or_path']}`" if model.get("name_or_path") else ""),
        ],
        ["started from", f"`{base}`" if base else "a model built in code (`model._target_`, `model.spec`)"],
        [
            "LoRA",
            f"r {peft.get('r')}, alpha {peft.get('lora_alpha')}" if is_lora(peft) else "no (full fine-tuning)",
        ],
        ["steps", str(_select(cfg, "trainer.max_steps"))],
        ["seed", str(run.seed)],
    ]
    weights = (
        "the LoRA adapter only (PEFT format), to load onto the base it started from (below)"
        if adapter_only
        else "the trained model" + (", LoRA merged into the weights" if is_lora(peft) else "")
    )
    return [
        "## Training",
        "",
        f"This directory holds {weights}. The run's command (overrides as Hydra recorded them; the config "
        "groups' defaults are in the repository's `conf/`):",
        "",
        "```bash",
        command,
        "```",
        "",
        *md_table(["", ""], rows),
    ]


def _data(run: ReportRun, cfg) -> list[str]:
    data = _select(cfg, "data") or {}
    adapter = str((data.get("adapter") or {}).get("_target_", "?")).removeprefix("unveil.data.adapters.")
    rows = [["format", f"`{adapter.removesuffix('.read')}`"], ["root", f"`{data.get('root')}`"]]
    syn = data.get("synthetic")
    if syn:
        keys = ("n_patients", "seed", "image_size", "modalities", "findings", "p_normal")
        rows.append(["synthetic set", ", ".join(f"{k} {syn.get(k)}" for k in keys if k in syn)])
    rows.append(["splits", ", ".join(f"{k}: `{v}`" for k, v in (data.get("splits") or {}).items() if v)])
    if data.get("max_samples"):
        rows.append(["first records only", json.dumps(data["max_samples"])])
    n_test = len(run.run.predictions)
    if n_test:
        rows.append(["test records scored", str(n_test)])
    return ["", "## Data", "", *md_table(["", ""], rows)]


def _metrics(run: ReportRun) -> list[str]:
    table = run.run.table()
    metrics = list(dict.fromkeys(k for r in table for k in r if k != "group"))
    lines = ["", "## Metrics", ""]
    if metrics:
        rows = [[r["group"]] + [fmt(r[m]) if r.get(m) is not None else "n/a" for m in metrics] for r in table]
        lines += ["On the evaluation split (`metrics.json`, `test/...`):", "", *md_table(["", *metrics], rows)]
    last = [[k, fmt(run.value(k))] for k in TRAINING if math.isfinite(run.value(k))]
    if last:
        lines += ["", "Last logged training metrics:", "", *md_table(["metric", "value"], last)]
    return lines if len(lines) > 3 else lines + ["The run was not evaluated (`eval.enabled=false`)."]


def _usage(out: Path, base: str | None, adapter_only: bool, tiny_tower: bool) -> list[str]:
    lines = ["", "## Use", "", "```python"]
    if tiny_tower:
        lines.append("import unveil.models.conv_vision  # registers unveil's conv vision tower with transformers")
    if adapter_only:
        lines.append("from peft import PeftModel")
    lines += ["from transformers import AutoModelForImageTextToText, AutoProcessor", ""]
    if adapter_only:
        lines += [
            f'base = AutoModelForImageTextToText.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{out.name}")  # model.merge_and_unload() for plain weights',
        ]
    else:
        lines.append(f'model = AutoModelForImageTextToText.from_pretrained("{out.name}")')
    lines += [f'processor = AutoProcessor.from_pretrained("{out.name}")', "```"]
    if not adapter_only:
        lines += ["", f"With unveil: `python -m unveil.eval ckpt_path={out.name}`, or `model.init_from={out.name}`."]
    return lines


def _config(run: ReportRun):
    """The run's config with ``paths.*`` left as names: they resolve to this machine's folders now,
    not to those the run used (``data.root`` reads ``${paths.data_dir}/synthetic/n24-s0-px128``)."""
    raw = dict(run.run.config or {})
    raw["paths"] = {k: "\\${paths." + k + "}" for k in raw.get("paths") or {}}
    from unveil.eval.old_configs import upgrade

    return upgrade(OmegaConf.create(raw))  # a run of the registry era reads as a current one


def model_card(run: ReportRun, out: Path, base: str | None, adapter_only: bool) -> str:
    cfg = _config(run)
    box = (
        dict(line.split("=", 1) for line in (out / "unveil_backbone.txt").read_text().split())
        if (out / "unveil_backbone.txt").exists()
        else {}
    )
    # unveil's own conv tower (the tiny model) needs unveil imported before transformers can load it
    hf_config = (Path(base) if adapter_only and base else out) / "config.json"
    vision = json.loads(hf_config.read_text()).get("vision_config") or {} if hf_config.exists() else {}
    tiny_tower = vision.get("model_type") == "unveil_conv_vision"
    title = f"# {out.name}"
    intro = (
        f"{MARK} from the run `{run.path.name}` of unveil, a framework that trains medical "
        "vision-language models to find, localise and explain abnormalities. Answers write boxes in the "
        f"`{box.get('box_format', _select(cfg, 'model.box_format'))}` box format."
    )
    lines = [*_front_matter(cfg, base, adapter_only), "", title, "", intro, ""]
    lines += _training(run, cfg, base, adapter_only) + _data(run, cfg) + _metrics(run)
    lines += _usage(out, base, adapter_only, tiny_tower)
    config = OmegaConf.to_yaml(OmegaConf.create(_scrubbed(run.run.config or {})))
    lines += ["", "## Config", "", "The run's `.hydra/config.yaml` (secrets never enter it):", "", "```yaml"]
    return "\n".join(lines + [config.rstrip(), "```", ""])


def _scrubbed(config: dict) -> dict:
    from unveil.utils.secrets import scrub

    return scrub(config)
