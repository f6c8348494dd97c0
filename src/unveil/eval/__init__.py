"""Evaluation: prediction parsing, torchmetrics-based metrics, and the evaluation task.

``python -m unveil.eval ckpt_path=...`` runs :mod:`unveil.eval.__main__`.
"""


def load_for_eval(ckpt_path, data_cfg=None):
    """(backbone, datamodule) for a run dir, a Lightning .ckpt or a save_pretrained dir."""
    from unveil.eval.__main__ import load_for_eval as _load

    return _load(ckpt_path, data_cfg)
