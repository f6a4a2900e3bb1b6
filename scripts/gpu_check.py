"""The Python parts of scripts/gpu_check.sh (run that; this file holds its pieces).

    python scripts/gpu_check.py env --json OUT/env.json
    torchrun --standalone --nproc_per_node N scripts/gpu_check.py nccl --json OUT/nccl_N.json
    python scripts/gpu_check.py devices --json OUT/devices.json [--device cpu]
    python scripts/gpu_check.py derive-config SRC.json DST.json
    python scripts/gpu_check.py resume-compare --full RUN_A --resumed RUN_B --log LOG
    deepspeed --no_local_rank ... scripts/gpu_check.py run-deterministic pretrain/run.py ARGS
    python scripts/gpu_check.py bench-goals OUT/bench_gpu.json

Each subcommand prints what it found and exits 0 when its check passed, 1 when it failed,
2 when it cannot run (no CUDA device where one is needed: one line); resume-compare exits
3 when the runs were not deterministic (see there).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4  # the data_prep layout; for random data only
TIMING = {"tokens_per_s", "step_s", "table_sync_s"}  # metrics fields that are clock readings

# Part b's tolerance on the losses of 5 fp32 steps, CPU against GPU, relative.
# fp32 rounds at 2^-24 ~ 6e-8; a GPU sums in another order (cuBLAS tiles, SDPA's
# memory-efficient kernel, parallel reductions), which leaves a loss of the tiny model
# about 1e-7 to 1e-6 apart (rounding grows like the square root of a reduction's length,
# here up to 128 keys and 256 FFN units, over 4 layers). Five AdamW steps of lr 1e-3
# move each weight by about lr, so these differences enter the weights at ~1e-6 relative
# and stay of that order; 1e-4 leaves a factor of ~10 or more. Anything that changes the
# computation is larger: TF32 matmuls (10-bit mantissa, ~1e-3 per product; measured
# below as information), bf16 creeping in (~4e-3), a wrong mask or a dropped token
# (~1e-2 and more). Selection flips (two ids whose loss_ema scores differ by less than
# the rounding) would change the kept positions: the check reports any such step.
DEVICE_TOLERANCE = 1e-4
DEVICE_STEPS = 5


def refuse_without_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        print(
            f"gpu_check.py {what}: error: no CUDA device (torch.cuda.is_available() is False)",
            file=sys.stderr,
        )
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------
# env: versions for the summary
# ---------------------------------------------------------------------------------------


def cmd_env(args) -> int:
    import deepspeed

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info.update(
            gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            gpu_count=torch.cuda.device_count(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.split()
            info["driver"] = out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info.update(gpus=[], gpu_count=0, cuda=None, cudnn=None, nccl=None, driver=None)
    line = (
        f"device {', '.join(info['gpus']) or 'none (CPU)'}; driver {info['driver']}; "
        f"CUDA {info['cuda']}; torch {info['torch']}; deepspeed {info['deepspeed']}; "
        f"NCCL {info['nccl']}; Python {info['python']}"
    )
    info["line"] = line
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------
# nccl: collectives over the ranks of a launcher (part a)
# ---------------------------------------------------------------------------------------


def cmd_nccl(args) -> int:
    import torch.distributed as dist

    from pretrain import distributed
    from pretrain.importance import ImportanceTable

    if args.device == "cuda":
        refuse_without_cuda("nccl")
    distributed.init(timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = distributed.device()
    backend = dist.get_backend()
    results: list[dict] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        results.append({"check": name, "ok": bool(ok), "detail": detail})

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    expected_sum = world * (world + 1) / 2  # ranks contribute rank + 1
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        t = torch.full((4099,), rank + 1, dtype=dtype, device=device)  # an odd length
        dist.all_reduce(t)
        check(f"all_reduce sum {dtype}", bool((t == expected_sum).all()), f"{t[0].item()}")
    t = torch.tensor([rank * 7 + 3], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    check("all_reduce max int64", t.item() == (world - 1) * 7 + 3, f"{t.item()}")

    for src in sorted({0, world - 1}):
        gen = torch.Generator().manual_seed(1000 + src)
        expected = torch.randn(1 << 20, generator=gen).to(device)  # the same on every rank
        t = expected.clone() if rank == src else torch.zeros_like(expected)
        dist.broadcast(t, src=src)
        check(f"broadcast from rank {src}", torch.equal(t, expected))

    # What ZeRO-2/3 use: all_gather and reduce_scatter of flat buffers (not on gloo).
    if backend == "nccl":
        part = torch.full((1 << 16,), float(rank), device=device)
        gathered = torch.empty(world << 16, device=device)
        dist.all_gather_into_tensor(gathered, part)
        want = torch.arange(world, device=device, dtype=torch.float32).repeat_interleave(1 << 16)
        check("all_gather_into_tensor", torch.equal(gathered, want))
        full = torch.arange(world << 10, device=device, dtype=torch.float32) * (rank + 1)
        out = torch.empty(1 << 10, device=device)
        dist.reduce_scatter_tensor(out, full)
        mine = torch.arange(rank << 10, (rank + 1) << 10, device=device, dtype=torch.float32)
        check("reduce_scatter_tensor", torch.equal(out, mine * expected_sum))

    # The project's own collectives: the trainer's float64 sums and the importance table.
    sums = distributed.all_reduce_sum([float(rank), 1.0])
    check("distributed.all_reduce_sum", sums == [world * (world - 1) / 2, float(world)], str(sums))
    table = ImportanceTable(64, "loss_ema", allow_ids=(CLS,), deny_ids=(PAD,), device=device)
    ids = torch.tensor([10, 10 + rank], device=device)
    table.accumulate(ids, torch.tensor([1.0, float(rank + 2)], device=device))
    table.synchronize_and_apply()
    try:
        table.verify_synchronized()
        check("importance table synchronized", True)
    except RuntimeError as e:
        check("importance table synchronized", False, str(e))

    # Bandwidth of a large all_reduce (information, not a check).
    numel = args.mb * (1 << 20) // 4
    big = torch.ones(numel, dtype=torch.float32, device=device)
    for _ in range(2):
        dist.all_reduce(big)
    sync()
    big.fill_(1.0)
    iters = 5
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(big)
    sync()
    seconds = (time.perf_counter() - start) / iters
    check("all_reduce large", bool((big[:: max(1, numel // 4096)] == world**iters).all()))
    algbw = numel * 4 / seconds / 1e9
    bandwidth = {
        "mb": args.mb,
        "seconds": seconds,
        "algbw_gb_s": algbw,
        "busbw_gb_s": algbw * 2 * (world - 1) / world,
    }

    failed = [r for r in results if not r["ok"]]
    (bad_ranks,) = distributed.all_reduce_sum([float(bool(failed))])
    if failed:
        for r in failed:
            print(f"nccl: rank {rank}: FAIL {r['check']} {r['detail']}", file=sys.stderr)
    if rank == 0:
        report = {
            "world_size": world,
            "backend": backend,
            "device": str(device),
            "checks": results,
            "ranks_failed": int(bad_ranks),
            "all_reduce_bandwidth": bandwidth,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(
            f"nccl: {world} rank(s), backend {backend}: {len(results)} checks, "
            f"{int(bad_ranks)} rank(s) failed; all_reduce of {args.mb} MB {seconds * 1e3:.2f} ms "
            f"(bus bandwidth {bandwidth['busbw_gb_s']:.1f} GB/s)"
        )
    distributed.shutdown()
    return 1 if bad_ranks else 0


# ---------------------------------------------------------------------------------------
# devices: the tiny model's losses, CPU against GPU (part b)
# ---------------------------------------------------------------------------------------


def make_batches(num: int, batch: int, seq_len: int, vocab: int, seed: int) -> list:
    """Random rows with 15% dynamic masking; each batch's last row ends in padding, so
    the attention's key padding mask is exercised too."""
    from pretrain.masking import DynamicMasker

    gen = torch.Generator().manual_seed(seed)
    masker = DynamicMasker((PAD, UNK, CLS, SEP, MASK), MASK, vocab, seed=seed)
    out = []
    for b in range(num):
        ids = torch.randint(5, vocab, (batch, seq_len), generator=gen)
        ids[:, 0], ids[:, -1] = CLS, SEP
        attention_mask = torch.ones(batch, seq_len, dtype=torch.bool)
        real = seq_len - seq_len // 4
        ids[-1, real - 1], ids[-1, real:], attention_mask[-1, real:] = SEP, PAD, False
        masked, labels = masker(ids, torch.arange(b * batch, (b + 1) * batch), epoch=0)
        out.append((masked, attention_mask, labels))
    return out


def train_tiny(device: torch.device, kernels: str, batches: list, seed: int) -> dict:
    """DEVICE_STEPS steps of plain PyTorch training: BertForTokenDropPretraining (fp32,
    dropout 0), ImportanceTable.select (loss_ema, keep 0.5), AdamW with clipping.
    Initialised on the CPU, so every device starts alike; the selection draws from a CPU
    generator on every device (a CUDA generator gives other numbers), so that both devices
    keep the same positions as long as their tables rank the ids alike."""
    from pretrain.importance import ImportanceTable
    from pretrain.model import BertForTokenDropPretraining, ModelConfig, num_kept_tokens

    vocab = 4096
    cfg = ModelConfig.from_preset("tiny", vocab_size=vocab, dropout=0.0, kernels=kernels)
    torch.manual_seed(seed)
    model = BertForTokenDropPretraining(cfg).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01
    )
    table = ImportanceTable(
        vocab, "loss_ema", allow_ids=(UNK, CLS, SEP, MASK), deny_ids=(PAD,), device=device
    )
    seq_len = batches[0][0].shape[1]
    kept = num_kept_tokens(seq_len, 0.5)
    extra = {}  # the trainer's static prediction width, where the model takes one
    if "prediction_width" in inspect.signature(model.forward).parameters:
        from pretrain.masking import max_predictions

        extra["prediction_width"] = max_predictions(seq_len)
    losses, grad_norms, kept_list = [], [], []
    for step in range(DEVICE_STEPS):
        ids, attention_mask, labels = (t.to(device) for t in batches[step % len(batches)])
        generator = torch.Generator().manual_seed(seed * 7919 + step)
        kept_idx = table.select(ids, kept, generator)
        out = model(ids, attention_mask, labels, kept_idx, **extra)
        out.loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        table.accumulate(out.target_ids, out.token_losses)
        table.synchronize_and_apply()
        losses.append(float(out.loss.detach()))
        kept_list.append(kept_idx.cpu())
    return {"losses": losses, "grad_norms": grad_norms, "kept": kept_list}


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(a, b, strict=True))


def cmd_devices(args) -> int:
    if args.device == "cuda":
        refuse_without_cuda("devices")
    torch.set_float32_matmul_precision("highest")  # no TF32: fp32 means fp32
    batches = make_batches(DEVICE_STEPS, 8, 128, 4096, args.seed)
    cpu = torch.device("cpu")
    reference = train_tiny(cpu, "auto", batches, args.seed)
    if args.device == "cuda":
        other_name = f"cuda ({torch.cuda.get_device_name(0)})"
        other = train_tiny(torch.device("cuda", 0), "auto", batches, args.seed)
    else:  # the smoke test: PyTorch's ops on the CPU, which is what a GPU runs
        other_name = "cpu with kernels=torch (the --cpu-smoke stand-in for a GPU)"
        other = train_tiny(cpu, "torch", batches, args.seed)
    rel = max_rel(reference["losses"], other["losses"])
    rel_first = max_rel(reference["losses"][:1], other["losses"][:1])
    rel_norm = max_rel(reference["grad_norms"], other["grad_norms"])
    same_kept = [torch.equal(a, b) for a, b in zip(reference["kept"], other["kept"], strict=True)]
    report = {
        "steps": DEVICE_STEPS,
        "tolerance_rel": DEVICE_TOLERANCE,
        "reference": "cpu",
        "other": other_name,
        "losses_cpu": reference["losses"],
        "losses_other": other["losses"],
        "grad_norms_cpu": reference["grad_norms"],
        "grad_norms_other": other["grad_norms"],
        "max_rel_loss_diff": rel,
        "first_step_rel_loss_diff": rel_first,
        "max_rel_grad_norm_diff": rel_norm,
        "kept_positions_equal": same_kept,
    }
    if args.device == "cuda":  # how far TF32 would move them: information, not a check
        torch.set_float32_matmul_precision("high")
        tf32 = train_tiny(torch.device("cuda", 0), "auto", batches, args.seed)
        torch.set_float32_matmul_precision("highest")
        report["tf32_max_rel_loss_diff"] = max_rel(reference["losses"], tf32["losses"])
    ok = rel <= DEVICE_TOLERANCE and all(math.isfinite(v) for v in other["losses"])
    report["pass"] = ok
    print(f"devices: cpu against {other_name}, {DEVICE_STEPS} fp32 steps, dropout 0")
    for step, (a, b) in enumerate(zip(reference["losses"], other["losses"], strict=True)):
        note = "" if same_kept[step] else "  (kept positions differ)"
        diff = abs(a - b) / a
        print(f"  step {step + 1}: loss cpu {a:.9f}  other {b:.9f}  rel {diff:.2e}{note}")
    print(
        f"  max relative loss difference {rel:.3e} (first step {rel_first:.3e}; grad norms "
        f"{rel_norm:.3e}); tolerance {DEVICE_TOLERANCE:.0e}: {'PASS' if ok else 'FAIL'}"
    )
    if "tf32_max_rel_loss_diff" in report:
        tf32 = report["tf32_max_rel_loss_diff"]
        print(f"  for scale: with TF32 matmuls the difference is {tf32:.3e}")
    if not all(same_kept):
        print("  note: the kept positions differ at some step: a selection flip, not kernel noise")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------
# derive-config and resume-compare (part c)
# ---------------------------------------------------------------------------------------


def cmd_derive_config(args) -> int:
    """A copy of a DeepSpeed JSON whose warmup is short enough for a 20-step check.

    The GPU configs warm up over 10,000 steps to 1e-4: in 20 steps the rate stays below
    2e-7, and bf16 weights (8-bit mantissa) would not change at all, so a resume that
    failed to restore the weights or the optimizer would still give equal losses. With
    a 5-step warmup to 1e-3 every step moves the weights. Batch sizes, precision, ZeRO
    and optimizer are the JSON's.
    """
    ds = json.loads(Path(args.src).read_text())
    params = ds.get("scheduler", {}).get("params")
    if params is not None:
        params["warmup_num_steps"] = args.warmup_steps
        params["warmup_max_lr"] = args.max_lr
        params.pop("total_num_steps", None)
    Path(args.dst).write_text(json.dumps(ds, indent=2) + "\n")
    return 0


def cmd_list_configs(args) -> int:
    """Part c's configs, one a line: name, JSON stem, 1 if pipelined, why it is skipped.

    Every ds_configs/gpu_*.json (cpu_*.json with --cpu), so that a new configuration is
    checked without editing the check; the pipelined ones (a "pipeline" section or name)
    last. A configuration that needs what is not installed (apex) is skipped, with why.
    """
    import importlib.util

    found = []
    for path in sorted((REPO / "ds_configs").glob("cpu_*.json" if args.cpu else "gpu_*.json")):
        ds = json.loads(path.read_text())
        name = path.stem.split("_", 1)[1]
        skip = ""
        optimizer = str((ds.get("optimizer") or {}).get("type", ""))
        if args.cpu and (ds.get("fp16") or {}).get("enabled"):
            skip = "fp16 needs a GPU"
        elif optimizer.startswith("apex.") and importlib.util.find_spec("apex") is None:
            skip = f"its optimizer {optimizer} needs NVIDIA apex, which is not installed"
        pipelined = "pipeline" in ds or "pipeline" in name  # cpu_pipeline.json has no section
        found.append((pipelined, name, path.stem, skip))
    for pipelined, name, stem, skip in sorted(found):
        print(f"{name}\t{stem}\t{int(pipelined)}\t{skip}")
    return 0


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


NONDETERMINISTIC = 3  # resume-compare's exit code when two fresh runs already differ


def cmd_resume_compare(args) -> int:
    """The resumed run's metrics against the uninterrupted run's, every field but timings.

    Steps 1..stop of the resumed run's file come from its first launch, a fresh run like
    the uninterrupted one: if those already differ, the runs are not deterministic on this
    machine and the steps after the resume cannot be equal either, whatever the resume
    did; that is exit code 3 (NONDETERMINISTIC) rather than 1.
    """
    full_path = Path(args.full) / "metrics.jsonl"
    resumed_path = Path(args.resumed) / "metrics.jsonl"
    name = args.name or Path(args.resumed).parent.name
    missing = [f"{path} is missing" for path in (full_path, resumed_path) if not path.is_file()]
    if missing:
        print(f"resume [{name}]: FAIL: " + "; ".join(missing))
        return 1
    problems = []  # a run that did not go as asked
    differences = []  # runs that went as asked, with different numbers

    def without_timings(path):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(path)]

    def split(lines):
        train = {r["step"]: r for r in lines if "loss" in r}
        evals = {r["step"]: r for r in lines if "val_loss" in r}
        return train, evals

    full_train, full_eval = split(without_timings(full_path))
    res_train, res_eval = split(without_timings(resumed_path))
    expected = list(range(1, args.steps + 1))
    for what, train in (("uninterrupted", full_train), ("resumed", res_train)):
        if sorted(train) != expected:
            problems.append(f"the {what} run logged steps {sorted(train)}, not 1..{args.steps}")
    if args.log:
        text = Path(args.log).read_text(errors="replace") if Path(args.log).is_file() else ""
        if f"at step {args.stop}" not in text or "resumed from" not in text:
            problems.append(f"{args.log} does not say 'resumed from ... at step {args.stop}'")

    def differing(steps):
        return [s for s in steps if full_train.get(s) != res_train.get(s)]

    def fields(steps):
        keys = set()
        for s in steps:
            a, b = full_train.get(s, {}), res_train.get(s, {})
            keys |= {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
        return sorted(keys)

    def loss_gap(steps):
        gaps = [
            abs(full_train[s]["loss"] - res_train[s]["loss"])
            for s in steps
            if s in full_train and s in res_train
        ]
        return f"{max(gaps):.3e}" if gaps else "-"

    before = differing(range(1, args.stop + 1))
    after = differing(range(args.stop + 1, args.steps + 1))
    eval_diff = sorted(
        s for s in set(full_eval) | set(res_eval) if full_eval.get(s) != res_eval.get(s)
    )
    if before:
        differences.append(
            f"steps {before} differ already BEFORE the checkpoint (fields {fields(before)}; "
            f"max |loss diff| {loss_gap(before)}): two fresh runs are not bit-identical here, "
            "which is nondeterminism, not the resume"
        )
    if after:
        differences.append(
            f"resumed steps {after} differ (fields {fields(after)}; max |loss diff| "
            f"{loss_gap(after)})"
        )
    if eval_diff:
        differences.append(f"validation lines of steps {eval_diff} differ")
    if not problems and not differences:
        skipped = sum(1 for r in full_train.values() if r.get("skipped"))
        note = f"; {skipped} steps skipped by fp16 loss scaling in both" if skipped else ""
        print(
            f"resume [{name}]: PASS: {len(full_train)} steps and {len(full_eval)} validation "
            f"line(s) equal, every field but timings (steps 1..{args.stop} before the "
            f"checkpoint, {args.stop + 1}..{args.steps} after the resume){note}"
        )
        return 0
    print(f"resume [{name}]: FAIL: " + "; ".join(problems + differences))
    return NONDETERMINISTIC if before and not problems else 1


def cmd_run_deterministic(args) -> int:
    """Run a script (pretrain/run.py) under torch.use_deterministic_algorithms(True).

    Part c's second try when two fresh runs differ: atomics in backward kernels (flash
    and memory-efficient attention, scatter_add_, index_add_) sum in a varying order
    unless told otherwise. cuBLAS needs CUBLAS_WORKSPACE_CONFIG for it, read at its
    first use, so set here before any CUDA work. The launcher must be given
    --no_local_rank (run.py takes its rank from the environment).
    """
    import runpy

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    sys.argv = [args.script, *args.script_args]
    runpy.run_path(args.script, run_name="__main__")
    return 0


# ---------------------------------------------------------------------------------------
# bench-goals: the benchmark's figures against the project's GPU goals (part d)
# ---------------------------------------------------------------------------------------

GOAL_MFU = 0.50  # dense bert-base, sequence 512, bf16, H100-class GPU
GOAL_SAVED = 0.25  # token dropping's share of the dense step time saved there


def cmd_bench_goals(args) -> int:
    """Information, not a check: the goals are about the code's speed, not its correctness."""
    report = json.loads(Path(args.json).read_text())
    cases = [c for c in report["cases"] if c.get("seq_len") == 512 and "error" not in c]
    if not cases:
        print("goals: no sequence-512 case in the benchmark's results")
        return 0
    case = cases[0]
    mfu = case["dense"]["mfu"]
    where = f"{report['model']} at 512 x {case['batch_size']}, {report['dtype']}"
    if mfu is None:
        print(f"goal dense MFU >= {GOAL_MFU:.0%}: no peak rate known ({report['peak_source']})")
    else:
        met = "met" if mfu >= GOAL_MFU else "NOT met"
        print(f"goal dense MFU >= {GOAL_MFU:.0%} ({where}): {mfu:.1%}, {met}")
    saved = case["step_time_saved"]
    met = "met" if saved >= GOAL_SAVED else "NOT met"
    print(
        f"goal token dropping saves >= {GOAL_SAVED:.0%} of the step time ({where}): "
        f"{saved:.1%} (FLOPs ratio {case['flops_ratio']:.3f}), {met}"
    )
    return 0


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="versions for the summary")
    p.add_argument("--json")
    p.set_defaults(run=cmd_env)

    p = sub.add_parser("nccl", help="collectives over the launcher's ranks (part a)")
    p.add_argument("--json")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--mb", type=int, default=256, help="size of the timed all_reduce")
    p.add_argument("--timeout", type=int, default=120, help="collective timeout, seconds")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.set_defaults(run=cmd_nccl)

    p = sub.add_parser("devices", help="the tiny model's losses, CPU against GPU (part b)")
    p.add_argument("--json")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seed", type=int, default=5)
    p.set_defaults(run=cmd_devices)

    p = sub.add_parser("derive-config", help="a DeepSpeed JSON with a short warmup (part c)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--max-lr", type=float, default=1e-3)
    p.set_defaults(run=cmd_derive_config)

    p = sub.add_parser("list-configs", help="the DeepSpeed JSONs part c runs")
    p.add_argument("--cpu", action="store_true", help="cpu_*.json instead of gpu_*.json")
    p.set_defaults(run=cmd_list_configs)

    p = sub.add_parser("resume-compare", help="resumed against uninterrupted metrics (part c)")
    p.add_argument("--full", required=True, help="RUN_DIR of the uninterrupted run")
    p.add_argument("--resumed", required=True, help="RUN_DIR of the stopped and resumed run")
    p.add_argument("--log", help="the resuming launch's log")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--stop", type=int, default=10)
    p.add_argument("--name")
    p.set_defaults(run=cmd_resume_compare)

    p = sub.add_parser("run-deterministic", help="run a script with deterministic algorithms")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    p.set_defaults(run=cmd_run_deterministic)

    p = sub.add_parser("bench-goals", help="bench_gpu.py's figures against the goals (part d)")
    p.add_argument("json")
    p.set_defaults(run=cmd_bench_goals)

    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
