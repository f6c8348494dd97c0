"""The notebooks run top to bottom in a real Jupyter kernel (nbclient + ipykernel): the two ablation
notebooks on the debug sweep (conftest), inspect_run.ipynb on a hand-made run; all stored without outputs."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, execute_notebook, notebook_outputs

NOTEBOOKS = ("inspect_run", "umed_ablation", "mmedpo_ablation")
# printed by a cell the test appends: what the notebook computed, for the assertions
FACTS = """
import json
print("FACTS", json.dumps({
    "rows": [g.label for g in report.groups], "baseline": report.baseline, "runs": len(report.runs),
    "committed": len(table), "samples": len(samples), "lost": sum(len(lost_iou(g)) for g in report.groups),
    "delta_iou": report.deltas[(1, "iou")].diff, "delta_n": report.deltas[(1, "iou")].n_studies,
}))
"""


def _facts(text: str) -> dict:
    return json.loads(text.split("FACTS ", 1)[1].splitlines()[0])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_stored_without_outputs(name):
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    if name != "inspect_run":  # papermill-style: the parameters cell is tagged
        assert any("parameters" in c["metadata"].get("tags", []) for c in code)


@pytest.mark.slow
def test_umed_notebook_on_a_debug_sweep(debug_sweep):
    nb = execute_notebook(
        ROOT / "notebooks" / "umed_ablation.ipynb", {"UNVEIL_SWEEP": str(debug_sweep), "UNVEIL_N_BOOT": "200"}, FACTS
    )
    text, images = notebook_outputs(nb)
    facts = _facts(text)
    # sft/ then rl/: SFT is row 0 (the baseline), GRPO's two seeds one row
    assert facts["runs"] == 3 and facts["baseline"] == 0 and "stage=sft" in facts["rows"][0]
    assert len(facts["rows"]) == 2 and "stage=grpo" in facts["rows"][1]
    assert facts["committed"] == 9 and "0.713 ± 0.002" in text  # the committed table (PPO plain, average)
    assert facts["samples"] > 0 and "vision_relevance" in text  # completions with each head's reward
    assert facts["lost"] > 0 and facts["delta_n"] > 0 and facts["delta_iou"] == facts["delta_iou"]
    assert images >= 6  # committed table, bars, delta, modality, curves, drawn studies


@pytest.mark.slow
def test_mmedpo_notebook_on_a_debug_sweep(debug_sweep):
    nb = execute_notebook(
        ROOT / "notebooks" / "mmedpo_ablation.ipynb", {"UNVEIL_SWEEP": str(debug_sweep), "UNVEIL_N_BOOT": "200"}, FACTS
    )
    text, images = notebook_outputs(nb)
    facts = _facts(text)
    assert facts["runs"] == 3 and len(facts["rows"]) == 2  # no sft_test/ or dpo/ here: the whole sweep
    assert facts["committed"] == 7 and "normal studies" in text and "with boxes" in text
    assert facts["samples"] > 0 and images >= 5


def test_inspect_notebook_runs_in_a_kernel(tmp_path):
    """notebooks/inspect_run.ipynb on a hand-made run (an old one: metrics under pre-TRL names) and the
    committed results."""
    from test_runs import _fake_run

    d = _fake_run(tmp_path / "run")
    extra = (
        'import json\nprint("FACTS", json.dumps({"run": str(run.path), "breakdown": len(breakdown), '
        '"ablation": len(ablation), "reward": training.get("train/reward")}))'
    )
    nb = execute_notebook(ROOT / "notebooks" / "inspect_run.ipynb", {"UNVEIL_RUN": str(d)}, extra)
    facts = _facts(notebook_outputs(nb)[0])
    assert facts["run"] == str(d) and facts["breakdown"] == 3 and facts["ablation"] == 9
    assert facts["reward"] == 1.5  # an old run's metrics, under the current names
