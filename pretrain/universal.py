"""``python -m pretrain.universal RUN_DIR|CHECKPOINT``: make a checkpoint loadable on another
data-parallel world size.

ZeRO stages 1-3 partition the optimizer state by data-parallel rank, so a checkpoint
only loads on the world size that wrote it. DeepSpeed's *universal checkpoint* format
stores every parameter's state whole; this command converts a checkpoint of ours with
DeepSpeed's converter (``deepspeed.checkpoint.ds_to_universal``) into
``<tag>_universal`` next to it and copies our ``run_state.json`` there. Resume from it
with ``--resume RUN_DIR/checkpoints/<tag>_universal``: run.py then sets DeepSpeed's
``checkpoint.load_universal`` itself. The global batch size must stay the same (the data
order depends on it); the importance table and ``consumed_samples`` carry over exactly,
the per-rank RNG streams (dropout) are re-seeded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.checkpoint import find_checkpoint  # noqa: E402
from pretrain.config import ConfigError  # noqa: E402


def convert(path: str) -> str:
    """Convert the checkpoint at ``path`` (run dir, checkpoints dir or tag dir); return the
    universal checkpoint's directory."""
    ref = find_checkpoint(path, path)
    state = ref.run_state()
    if state.get("universal"):
        raise ConfigError(f"{ref.path} is already a universal checkpoint")
    out = f"{ref.path}_universal"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            ref.path,
            "--output_folder",
            out,
            "--inject_missing_state",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise ConfigError(f"DeepSpeed's converter failed on {ref.path}:\n{result.stderr[-2000:]}")
    state["universal"] = True
    with open(os.path.join(out, "run_state.json"), "w") as f:
        json.dump(state, f, indent=2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.universal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint", help="RUN_DIR (its latest checkpoint), or one checkpoint directory"
    )
    args = p.parse_args(argv)
    try:
        out = convert(args.checkpoint)
    except ConfigError as e:
        print(f"pretrain.universal: error: {e}", file=sys.stderr)
        return 2
    print(f"universal checkpoint: {out}\nresume with: --resume {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
