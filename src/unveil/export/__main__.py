"""``python -m unveil.export <run dir> <out dir> [--adapter-only] [--force]``"""

from __future__ import annotations

import argparse
from pathlib import Path

from unveil.export import export_run


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m unveil.export", description=__doc__)
    ap.add_argument("run_dir", type=Path, help="a finished training run (holds metrics.json and backbone/)")
    ap.add_argument("out_dir", type=Path, help="the model directory to write")
    ap.add_argument(
        "--adapter-only",
        action="store_true",
        help="peft=lora runs: the LoRA adapter (PEFT format) for the base the run trained on, not merged weights",
    )
    ap.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    a = ap.parse_args(argv)
    try:
        out = export_run(a.run_dir, a.out_dir, adapter_only=a.adapter_only, force=a.force)
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # bad input: the message says what to do
        raise SystemExit(f"unveil.export: {e}") from e
    print(f"wrote {out} ({'LoRA adapter' if a.adapter_only else 'merged model'} + README.md)")
    return out


if __name__ == "__main__":
    main()
