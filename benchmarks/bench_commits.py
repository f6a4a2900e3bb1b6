"""The model-step and training-loop benchmarks of two commits, side by side in one run.

    python benchmarks/bench_commits.py OLD_REV [--rounds 3] [--json OUT]

For a change that must not cost speed (a refactor): checks OLD_REV out into a temporary
git worktree, then runs ``bench_model.py --configs mid`` and ``bench_train.py
--skip-two-ranks`` of the old tree and of this working tree in turns (old, new, new, old,
...), so that drift in the machine's load hits both alike. Reports the median step
times of each and new / old.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BENCHES = {
    "model": ["benchmarks/bench_model.py", "--configs", "mid", "--steps", "6"],
    "train": ["benchmarks/bench_train.py", "--skip-two-ranks", "--steps", "6"],
}


def run_bench(tree: Path, args: list[str], out: Path) -> dict:
    subprocess.run(
        [sys.executable, *args, "--json", str(out)],
        cwd=tree,
        check=True,
        capture_output=True,
    )
    return json.loads(out.read_text())


def step_times(name: str, result: dict) -> dict[str, float]:
    """The figures compared: median seconds per step, by what was timed."""
    if name == "train":
        return {"loop": result["loop_step_s"], "bare model": result["model_step_s"]}
    mid = result["configs"]["mid"]
    return {"dense": mid["dense_step_s"], "drop": mid["drop_step_s"]}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("old", help="the commit to compare the working tree against")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_commits_") as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(old_tree), args.old],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            samples: dict = {}
            for r in range(args.rounds):
                order = [("old", old_tree), ("new", REPO)]
                if r % 2:
                    order.reverse()
                for name, bench_args in BENCHES.items():
                    for which, tree in order:
                        out = Path(tmp) / f"{name}-{which}-{r}.json"
                        times = step_times(name, run_bench(tree, bench_args, out))
                        for key, value in times.items():
                            samples.setdefault((name, key), {}).setdefault(which, []).append(value)
                        print(f"round {r} {name} {which}: {times}", file=sys.stderr)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(old_tree)], cwd=REPO, check=False
            )
    rows = []
    for (name, key), by_tree in samples.items():
        old, new = statistics.median(by_tree["old"]), statistics.median(by_tree["new"])
        rows.append({"bench": name, "timed": key, "old_s": old, "new_s": new, "new/old": new / old})
        print(f"{name:6s} {key:11s} old {old:.4f} s  new {new:.4f} s  new/old {new / old:.3f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "old": args.old,
                    "rows": rows,
                    "samples": {f"{n}/{k}": v for (n, k), v in samples.items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
