"""Pretrain a token-dropping BERT with DeepSpeed.

    deepspeed [--num_gpus N] pretrain/run.py --deepspeed_config ds_configs/X.json \\
        --data DATA_DIR --output RUN_DIR [--model tiny|bert-base|bert-large|config.json] ...
    mpirun -np N python pretrain/run.py ...        # DeepSpeed's MPI discovery
    python pretrain/run.py ...                     # one process, or RANK/WORLD_SIZE/... from any launcher

``python pretrain/run.py --help`` lists every option. Settings are checked before any
heavy work; a bad one is a one-line error and exit code 2. A rank that loses contact with
another (it died, or did not answer for ``--collective-timeout`` seconds) says so in one
line and exits with code 75 (``EX_TEMPFAIL``: the job can be requeued and resumed).
"""

from __future__ import annotations

import json
import os
import sys
from typing import NoReturn

if __package__ in (None, ""):  # run as a script (the launchers do): make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.config import ConfigError, parse_args, resolve  # noqa: E402

LOST_CONTACT = 75  # exit code (os.EX_TEMPFAIL): another rank died or stopped answering


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
        elif resolved.init is not None:
            _say(resolved.init.describe(resolved.model.max_position_embeddings))
    except ConfigError as e:
        _say(f"run.py: error: {e}")
        return 2

    from datetime import timedelta

    from data_prep.atomic import write_atomic
    from pretrain import distributed
    from pretrain.trainer import Trainer

    try:
        distributed.init(timeout=timedelta(seconds=resolved.run.collective_timeout))
        trainer = Trainer(resolved, initialise=ref is None)
        if distributed.rank() == 0:
            os.makedirs(run.output, exist_ok=True)
            text = json.dumps(resolved.to_dict(), indent=2)
            write_atomic(os.path.join(run.output, "config.json"), text.encode())
        trainer.resume(ref)
        if ref is not None and distributed.rank() == 0:
            print(f"run.py: resumed from {ref.path} at step {trainer.step}", file=sys.stderr)
        code = trainer.train()
    except ConfigError as e:  # found while reading weights: the same on every rank
        _say(f"run.py: error: {e}")
        return 2
    except Exception as e:
        reason = distributed.lost_contact(e)
        if reason is None:
            raise
        _exit_lost_contact(distributed.rank(), reason)
    distributed.shutdown()  # not after an error: its barrier would wait for the failed rank
    return code


def _exit_lost_contact(rank: int, reason: str) -> NoReturn:
    """End this rank at once after another rank was lost: one line, exit code 75.

    os._exit, not a return or sys.exit: a normal exit runs the interpreter's finalization
    and the atexit handlers. Measured on 2 CPU cores: finalization took 3 to 7 s, and
    under mpirun with a stopped peer the rank never exited at all, blocked in
    MPI_Finalize (which mpi4py registers at exit) waiting for that peer. No collective may
    run on this path either (so no distributed.shutdown()). metrics.jsonl is flushed line
    by line; at most TensorBoard's unflushed events are lost, and the job resumes from the
    last checkpoint anyway.
    """
    print(
        f"run.py: error: rank {rank} lost contact with another rank ({reason}); "
        "exiting so the job can be requeued",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(LOST_CONTACT)


if __name__ == "__main__":
    sys.exit(main())
