"""Pretrain a token-dropping BERT with DeepSpeed.

    deepspeed [--num_gpus N] pretrain/run.py --deepspeed_config ds_configs/X.json \\
        --data DATA_DIR --output RUN_DIR [--model tiny|bert-base|bert-large|config.json] ...
    mpirun -np N python pretrain/run.py ...        # DeepSpeed's MPI discovery
    python pretrain/run.py ...                     # one process, or RANK/WORLD_SIZE/... from any launcher

``python pretrain/run.py --help`` lists every option. Settings are checked before any
heavy work; a bad one is a one-line error and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):  # run as a script (the launchers do): make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.config import ConfigError, parse_args, resolve  # noqa: E402


def _say(text: str) -> None:
    from pretrain.distributed import launcher_rank

    if launcher_rank() == 0:
        print(text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    run = parse_args(argv)
    try:
        resolved = resolve(run)
        from pretrain import checkpoint

        ref = checkpoint.find_checkpoint(run.resume, run.output, say=_say)
        if ref is not None:
            state = ref.run_state()
            checkpoint.check_compatible(state, resolved.to_dict(), ref.path)
            checkpoint.prepare_resume(state, resolved.deepspeed, ref.path)
    except ConfigError as e:
        _say(f"run.py: error: {e}")
        return 2

    from pretrain import distributed
    from pretrain.trainer import Trainer

    distributed.init()
    trainer = Trainer(resolved)
    if distributed.rank() == 0:
        os.makedirs(run.output, exist_ok=True)
        with open(os.path.join(run.output, "config.json"), "w") as f:
            json.dump(resolved.to_dict(), f, indent=2)
    trainer.resume(ref)
    if ref is not None and distributed.rank() == 0:
        print(f"run.py: resumed from {ref.path} at step {trainer.step}", file=sys.stderr)
    code = trainer.train()
    distributed.shutdown()  # not after an error: its barrier would wait for the failed rank
    return code


if __name__ == "__main__":
    sys.exit(main())
