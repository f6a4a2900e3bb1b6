"""Run a short training in this process and count where tensors are read on the host.

    python tests/count_reads.py DATA_DIR RUN_DIR DS_CONFIG [run.py flags ...]

Every ``item()``, ``float()``, ``int()``, ``bool()``, ``tolist()`` and ``numpy()`` of a
tensor is a device-to-host read on a GPU: the host waits for the device. A
``TorchFunctionMode`` sees each one; it is charged to the code that asked for it (the
first frame outside torch: this project's or DeepSpeed's) and, for ours, to the trainer
method it happened under. Prints one JSON object: {"ours": {method: count}, "deepspeed":
count, "windows": reads of the step statistics}.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

from torch.overrides import TorchFunctionMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PRETRAIN = os.path.join(REPO, "pretrain") + os.sep
TORCH = os.path.dirname(__import__("torch").__file__) + os.sep
READS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy"}
PHASES = ("run_step", "read_steps", "evaluate", "save", "resume")


class CountReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ours: Counter[str] = Counter()
        self.deepspeed = 0
        self.places: Counter[str] = Counter()  # "phase file:line" of our reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in READS:
            self._charge()
        return func(*args, **(kwargs or {}))

    def _charge(self) -> None:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH):
            frame = frame.f_back
        if frame is None:
            return
        if not frame.f_code.co_filename.startswith(PRETRAIN):
            self.deepspeed += "deepspeed" in frame.f_code.co_filename
            return
        phase = "other"
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        while frame is not None:
            if frame.f_code.co_filename.endswith("trainer.py") and frame.f_code.co_name in PHASES:
                phase = frame.f_code.co_name
                break
            frame = frame.f_back
        self.ours[phase] += 1
        self.places[f"{phase} {where[len(REPO) + 1 :]}"] += 1


def main() -> None:
    data, out, ds, *flags = sys.argv[1:]
    from pretrain import distributed
    from pretrain.config import parse_args, resolve
    from pretrain.trainer import Trainer

    run = parse_args(["--data", data, "--output", out, "--deepspeed_config", ds, *flags])
    resolved = resolve(run)
    distributed.init()
    trainer = Trainer(resolved)
    windows = 0
    read_steps = trainer.read_steps

    def counted_read_steps(pending):
        nonlocal windows
        windows += 1
        return read_steps(pending)

    trainer.read_steps = counted_read_steps
    with CountReads() as counter:
        code = trainer.train()
    print(
        json.dumps(
            {
                "code": code,
                "ours": counter.ours,
                "deepspeed": counter.deepspeed,
                "windows": windows,
                "places": counter.places,
            }
        )
    )


if __name__ == "__main__":
    main()
