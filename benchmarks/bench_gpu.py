"""GPU training step of dense and token-dropped BERT: tokens/s, MFU and peak memory.

    python benchmarks/bench_gpu.py --json OUT.json            # bert-base, bf16, one GPU
    python benchmarks/bench_gpu.py --compile --json OUT.json  # the same, torch.compile'd
    python benchmarks/bench_gpu.py --device cpu --model tiny --steps 3 --warmup 1  # smoke test

Two models of the same weights, in one process, take turns step by step (the starting
one alternating, as in bench_model.py), so that clocks and other load hit both alike;
medians over the measured steps are reported:

    dense   BertForTokenDropPretraining without dropping (strategy none)
    drop    the same with loss_ema selection at --keep-ratio (0.5), its table updated

A step is what Trainer.run_step does for one micro-batch, data loading aside: select the
kept positions with a generator on the device (drop only), forward (with the static
prediction width P = max_predictions(S) where the model takes one, and no attention mask,
the rows being unpadded), backward, the optimizer step, the table's accumulate +
synchronize_and_apply, and one host read of the step's sums and gradient norm (what the
trainer reads once per logged step, at --log-every 1). Each step is timed between two
device synchronisations. By default (--engine auto) the models are one-process
DeepSpeed engines built from --ds-config (gpu_zero2_bf16.json on a GPU: bf16 weights,
fp32 master weights, FusedAdam, ZeRO-2 on a world of one): the path users run. When a
DeepSpeed engine cannot be built, the plain model with bf16 weights and torch's AdamW;
the JSON's "engine" says which ran and why.

Cases (--cases, SEQxBATCH): 128x256 and 512x64 on a GPU, the same 32,768 tokens a step.
Random token rows ([CLS] ... [SEP], no padding, as packed pretraining data) with 15%
dynamic masking; vocabulary --vocab-size (BERT's 30,522).

Reported per case and model: step time (median, all steps), tokens/s (batch x seq_len
/ step time, every input position counted, as the trainer's tokens_per_s), model FLOPs
from pretrain/flops.py (matmuls only, forward + backward; the drop model's own, smaller
count) and MFU = those FLOPs / step time / the device's peak dense bf16 rate, and the
peak memory (torch.cuda.max_memory_allocated) during that model's steps. Both models
stay resident, so every peak includes the other model's weights and optimizer state;
"step_peak_gb" is the peak above what was allocated just before the step (activations,
gradients, workspaces). Then drop/dense step time against the FLOPs ratio.

Peak rates: PEAK_BF16_TFLOPS below (NVIDIA's datasheets), matched on the device name;
--peak-tflops for another device or to override.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.flops import flops_ratio, train_step_breakdown, train_step_flops  # noqa: E402
from pretrain.importance import ImportanceTable  # noqa: E402
from pretrain.masking import IGNORE_INDEX, DynamicMasker  # noqa: E402
from pretrain.model import (  # noqa: E402
    PRESETS,
    BertForTokenDropPretraining,
    ModelConfig,
    num_kept_tokens,
)

try:  # the static prediction width P of the trainer's step (a newer model's forward)
    from pretrain.masking import max_predictions  # noqa: E402
except ImportError:
    max_predictions = None

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4  # the data_prep layout; here only for random data
SPECIAL_IDS = (PAD, UNK, CLS, SEP, MASK)
REPO = Path(__file__).resolve().parents[1]

# Peak dense (no sparsity) bf16 tensor-core rates in TFLOP/s, matched in order on
# torch.cuda.get_device_name(). Each is the "BF16 Tensor Core" figure of NVIDIA's
# datasheet for that product, which is quoted with 2:4 sparsity, halved. Clock and power
# limits of a given machine can keep it below these (KINDS.md of this workplace measured
# ~790 TFLOP/s for an 8192^3 bf16 matmul on random data on an H200).
PEAK_BF16_TFLOPS: list[tuple[str, float, str]] = [
    (r"\bGH200\b", 989.0, "NVIDIA GH200 Grace Hopper Superchip datasheet (H100 SXM rate)"),
    (r"\bH200 NVL\b", 835.0, "NVIDIA H200 datasheet, H200 NVL column: 1,671 sparse"),
    (r"\bH200\b", 989.0, "NVIDIA H200 datasheet, H200 SXM column: 1,979 sparse"),
    (r"\bH100 NVL\b", 835.0, "NVIDIA H100 datasheet, H100 NVL column: 1,671 sparse"),
    (r"\bH100 PCIe\b", 756.0, "NVIDIA H100 datasheet, H100 PCIe column: 1,513 sparse"),
    (r"\bH100\b", 989.0, "NVIDIA H100 datasheet, H100 SXM column: 1,979 sparse"),
    (r"\bA100\b", 312.0, "NVIDIA A100 datasheet: 312 dense, 624 sparse (SXM and PCIe)"),
    (r"\bL40S\b", 362.0, "NVIDIA L40S datasheet: 362.05 dense, 733 sparse"),
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet: 242 sparse"),
    (r"\bA10\b", 125.0, "NVIDIA A10 datasheet: 125 dense, 250 sparse"),
]

# The cases of a GPU run; on the CPU (a smoke test) small ones.
GPU_CASES = "128x256,512x64"
CPU_CASES = "128x4,512x2"


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    """The known peak dense bf16 rate of a device, and where the figure comes from."""
    for pattern, value, source in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return value, source
    return None, f"no known peak for {device_name!r}: give --peak-tflops"


def parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for item in text.split(","):
        seq, _, batch = item.strip().lower().partition("x")
        if not (seq.isdigit() and batch.isdigit()) or int(seq) < 8 or int(batch) < 1:
            raise ValueError(f"--cases {text!r}: give SEQxBATCH items such as 512x64")
        cases.append((int(seq), int(batch)))
    return cases


def machine_description(device: torch.device) -> dict:
    import deepspeed

    info = {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=torch.cuda.get_device_name(device),
            capability=f"{props.major}.{props.minor}",
            memory_gb=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
            flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
        )
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit"]
            out = subprocess.run(
                [*query, "--format=csv,noheader", f"--id={device.index or 0}"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            info["nvidia_smi"] = out
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    else:
        info["device"] = platform.processor() or "cpu"
    return info


def make_batches(num, batch_size, seq_len, vocab_size, seed, device):
    """Random packed rows ([CLS] ... [SEP], no padding) with dynamic 15% masking."""
    gen = torch.Generator().manual_seed(seed)
    masker = DynamicMasker(SPECIAL_IDS, MASK, vocab_size, seed=seed)
    batches = []
    for b in range(num):
        ids = torch.randint(len(SPECIAL_IDS), vocab_size, (batch_size, seq_len), generator=gen)
        ids[:, 0], ids[:, -1] = CLS, SEP
        masked, labels = masker(ids, torch.arange(b * batch_size, (b + 1) * batch_size), epoch=0)
        # no padding: attention_mask None, as the data loader passes it (Batch.padded)
        batches.append((masked.to(device), None, labels.to(device)))
    return batches


def ds_config_for(path: Path, batch_size: int) -> dict:
    """The DeepSpeed JSON with one micro-batch of ``batch_size`` per step, no scheduler
    (a constant rate: the step costs the same) and no TensorBoard (no run directory)."""
    ds = json.loads(path.read_text())
    ds["train_batch_size"] = batch_size
    ds["train_micro_batch_size_per_gpu"] = batch_size
    ds.pop("gradient_accumulation_steps", None)
    ds.pop("scheduler", None)
    ds.pop("tensorboard", None)
    ds["steps_per_print"] = 10**9
    ds["optimizer"]["params"]["lr"] = 1e-4
    return ds


class Contender:
    """One model (dense or drop) with its optimizer and importance table."""

    def __init__(self, name, model, ds, engine_kind, device, kept_tokens, vocab_size, seed):
        self.name, self.device, self.kept_tokens = name, device, kept_tokens
        self.seed = seed
        strategy = "none" if kept_tokens is None else "loss_ema"
        self.table = ImportanceTable(
            vocab_size, strategy, allow_ids=(UNK, CLS, SEP, MASK), deny_ids=(PAD,), device=device
        )
        self.engine = None
        if engine_kind == "deepspeed":
            import deepspeed

            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=model.parameters(), config=ds
            )
            self.forward = self.engine
            self.dtype = next(self.engine.module.parameters()).dtype
        else:
            bf16 = bool((ds.get("bf16") or {}).get("enabled"))
            self.dtype = torch.bfloat16 if bf16 else torch.float32
            self.model = model.to(device=device, dtype=self.dtype)
            params = ds["optimizer"]["params"]
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(),
                lr=1e-4,
                betas=tuple(params.get("betas", (0.9, 0.999))),
                eps=params.get("eps", 1e-8),
                weight_decay=params.get("weight_decay", 0.01),
                fused=device.type == "cuda",
            )
            self.clip = ds.get("gradient_clipping", 0.0)
            self.forward = self.model
        self.steps_done = 0
        self.prediction_width = None  # set per case when the model takes a static width

    def compile(self, fullgraph: bool) -> None:
        # as run.py --compile: the model's own forward, one static-shape graph per phase;
        # DeepSpeed's hooks around it stay eager (traced, its timers break the graph)
        module = self.engine.module if self.engine is not None else self.model
        module.forward = torch.compile(module.forward, fullgraph=fullgraph, dynamic=False)

    def step(self, batch) -> None:
        input_ids, attention_mask, labels = batch
        kept_idx = None
        if self.kept_tokens is not None:  # Trainer.select: a generator per micro-batch
            generator = torch.Generator(device=input_ids.device)
            generator.manual_seed(self.seed * 1_000_003 + self.steps_done)
            kept_idx = self.table.select(input_ids, self.kept_tokens, generator)
        predicted = labels != IGNORE_INDEX
        if kept_idx is not None:
            predicted &= torch.zeros_like(predicted).scatter_(1, kept_idx, True)
        extra = {} if self.prediction_width is None else {"prediction_width": self.prediction_width}
        out = self.forward(input_ids, attention_mask, labels, kept_idx, **extra)
        if self.engine is not None:
            self.engine.backward(out.loss)
            self.engine.step()
            grad_norm = self.engine.get_global_grad_norm()
        else:
            out.loss.backward()
            grad_norm = None
            if self.clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # Trainer.record and run_step: the table's update, then the step's sums read on the
        # host in one transfer (the trainer reads once per logged step; --log-every 1 here)
        self.table.accumulate(out.target_ids, out.token_losses)
        self.table.synchronize_and_apply()
        sums = [out.token_losses.sum(), out.num_correct, predicted.sum()]
        if grad_norm is not None:
            sums.append(grad_norm)
        values = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in sums]
        ).tolist()
        if not all(math.isfinite(v) for v in values):
            raise RuntimeError(f"{self.name}: a non-finite loss or gradient norm: {values}")
        self.steps_done += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def bench_case(contenders, seq_len, batch_size, args, cfg, device) -> dict:
    batches = make_batches(4, batch_size, seq_len, cfg.vocab_size, args.seed + seq_len, device)
    mask_fraction = statistics.mean(
        float((labels != IGNORE_INDEX).float().mean()) for _, _, labels in batches
    )
    times = {c.name: [] for c in contenders}
    peaks = {c.name: 0 for c in contenders}
    step_peaks = {c.name: 0 for c in contenders}
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        order = contenders if step % 2 == 0 else contenders[::-1]
        for c in order:
            sync(device)
            before = memory_allocated(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            c.step(batch)
            sync(device)
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                times[c.name].append(elapsed)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device)
                    peaks[c.name] = max(peaks[c.name], peak)
                    step_peaks[c.name] = max(step_peaks[c.name], peak - before)

    tokens = batch_size * seq_len
    result = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "tokens_per_step": tokens,
        "mask_fraction": mask_fraction,
        "kept_tokens": num_kept_tokens(seq_len, args.keep_ratio),
        "flops_ratio": flops_ratio(cfg, seq_len, args.keep_ratio, mask_fraction),
    }
    for c in contenders:
        keep = 1.0 if c.kept_tokens is None else args.keep_ratio
        flops = train_step_flops(cfg, batch_size, seq_len, keep, mask_fraction)
        median = statistics.median(times[c.name])
        tflops = flops / median / 1e12
        by_role: dict[str, float] = {}
        for stage in train_step_breakdown(cfg, batch_size, seq_len, keep, mask_fraction):
            by_role[stage.role] = by_role.get(stage.role, 0.0) + stage.train_flops / flops
        result[c.name] = {
            "step_s": median,
            "all_step_s": times[c.name],
            "tokens_per_s": tokens / median,
            "model_tflop_per_step": flops / 1e12,
            "achieved_tflops": tflops,
            "mfu": None if args.peak is None else tflops / args.peak,
            "flops_share_by_role": by_role,
            "peak_memory_gb": peaks[c.name] / 2**30 if device.type == "cuda" else None,
            "step_peak_gb": step_peaks[c.name] / 2**30 if device.type == "cuda" else None,
        }
    result["drop_over_dense"] = result["drop"]["step_s"] / result["dense"]["step_s"]
    result["drop_over_dense_per_flops_ratio"] = result["drop_over_dense"] / result["flops_ratio"]
    result["step_time_saved"] = 1.0 - result["drop_over_dense"]
    return result


def build_contenders(args, cfg, device, max_batch) -> tuple[list[Contender], str, str | None]:
    """The two contenders on the engine asked for (auto: DeepSpeed, else plain)."""
    ds = ds_config_for(args.ds_config, max_batch)
    torch.manual_seed(args.seed)
    dense_model = BertForTokenDropPretraining(cfg)
    drop_model = BertForTokenDropPretraining(cfg)
    drop_model.load_state_dict(dense_model.state_dict())
    kept = num_kept_tokens(args.cases[0][0], args.keep_ratio)  # set again for each case
    engines = ["deepspeed", "plain"] if args.engine == "auto" else [args.engine]
    why_not = None
    for kind in engines:
        try:
            if kind == "deepspeed":
                from pretrain import distributed

                distributed.init()  # a world of one on a free local port
            made = [
                Contender("dense", dense_model, ds, kind, device, None, cfg.vocab_size, args.seed),
                Contender("drop", drop_model, ds, kind, device, kept, cfg.vocab_size, args.seed),
            ]
            return made, kind, why_not
        except Exception as e:  # noqa: BLE001 - any failure to build an engine falls back
            if kind == engines[-1]:
                raise
            why_not = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(
                f"bench_gpu: no DeepSpeed engine ({why_not}); plain model instead", file=sys.stderr
            )
            # fresh CPU models: the failed attempt may have moved or cast them
            torch.manual_seed(args.seed)
            dense_model = BertForTokenDropPretraining(cfg)
            drop_model = BertForTokenDropPretraining(cfg)
            drop_model.load_state_dict(dense_model.state_dict())
    raise AssertionError("unreachable")


def print_table(report: dict) -> None:
    header = (
        f"{'seq x batch':<12} {'model':<6} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>9} "
        f"{'MFU':>6} {'peak GB':>8} {'step GB':>8}"
    )
    print(header)
    print("-" * len(header))
    for case in report["cases"]:
        for name in ("dense", "drop"):
            r = case[name]
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            peak = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}"
            step_gb = "-" if r["step_peak_gb"] is None else f"{r['step_peak_gb']:.2f}"
            print(
                f"{case['seq_len']:>4} x {case['batch_size']:<5} {name:<6} "
                f"{1000 * r['step_s']:>9.2f} {r['tokens_per_s']:>11,.0f} "
                f"{r['achieved_tflops']:>9.1f} {mfu:>6} {peak:>8} {step_gb:>8}"
            )
        print(
            f"{'':<12} drop/dense {case['drop_over_dense']:.3f} against FLOPs ratio "
            f"{case['flops_ratio']:.3f} ({case['drop_over_dense_per_flops_ratio']:.2f}x); "
            f"step time saved {100 * case['step_time_saved']:.1f}%"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", default="bert-base", choices=sorted(PRESETS))
    parser.add_argument(
        "--cases",
        default=None,
        help=f"SEQxBATCH,... (default {GPU_CASES} on a GPU, {CPU_CASES} on the CPU)",
    )
    parser.add_argument("--steps", type=int, default=30, help="measured steps per model and case")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps per model first")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--vocab-size", type=int, default=30522, help="BERT's by default")
    parser.add_argument(
        "--engine",
        choices=("auto", "deepspeed", "plain"),
        default="auto",
        help="auto: a one-process DeepSpeed engine, the plain model if that cannot be built",
    )
    parser.add_argument(
        "--ds-config",
        type=Path,
        default=None,
        help="DeepSpeed JSON for the engines and the plain model's precision (default "
        "ds_configs/gpu_zero2_bf16.json, on the CPU cpu_zero2.json); batch sizes are the case's",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for the MFU")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile both models' forward (fullgraph), as run.py --compile",
    )
    parser.add_argument(
        "--no-fullgraph",
        action="store_true",
        help="with --compile: allow graph breaks (default fullgraph=True, as run.py's --compile)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench_gpu: error: no CUDA device (torch.cuda.is_available() is False); "
            "--device cpu runs the smoke test",
            file=sys.stderr,
        )
        return 2
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if not 0 < args.keep_ratio < 1:
        parser.error("--keep-ratio must be in (0, 1): the drop model must drop")
    try:
        args.cases = parse_cases(args.cases or (GPU_CASES if args.device == "cuda" else CPU_CASES))
    except ValueError as e:
        parser.error(str(e))
    if args.ds_config is None:
        name = "gpu_zero2_bf16.json" if args.device == "cuda" else "cpu_zero2.json"
        args.ds_config = REPO / "ds_configs" / name
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    machine = machine_description(device)
    if args.peak_tflops is not None:
        args.peak, peak_source = args.peak_tflops, "--peak-tflops"
    elif device.type == "cuda":
        args.peak, peak_source = peak_tflops(machine["device"])
    else:
        args.peak, peak_source = None, "no peak for a CPU: give --peak-tflops"

    max_seq = max(seq for seq, _ in args.cases)
    cfg = ModelConfig.from_preset(
        args.model,
        vocab_size=args.vocab_size,
        max_position_embeddings=max(512, max_seq),
        dropout=0.1,
    )
    contenders, engine, why_not = build_contenders(
        args, cfg, device, max(batch for _, batch in args.cases)
    )
    if args.compile:
        for c in contenders:
            c.compile(fullgraph=not args.no_fullgraph)
    dtype = str(contenders[0].dtype).replace("torch.", "")
    print(
        f"bench_gpu: {args.model} on {machine['device']}, {engine} engine "
        f"({args.ds_config.name}, {dtype}{', compiled' if args.compile else ''}), "
        f"peak {args.peak} TFLOP/s ({peak_source})",
        file=sys.stderr,
    )

    forward_args = inspect.signature(BertForTokenDropPretraining.forward).parameters
    static_width = max_predictions is not None and "prediction_width" in forward_args
    report = {
        "benchmark": "GPU training step, dense and token-dropped",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "model": args.model,
        "model_config": cfg.to_dict(),
        "engine": engine,
        "engine_fallback_reason": why_not,
        "ds_config": str(args.ds_config),
        "dtype": dtype,
        "static_prediction_width": static_width,
        "compile": args.compile and ("fullgraph" if not args.no_fullgraph else "graph breaks"),
        "keep_ratio": args.keep_ratio,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": args.peak,
        "peak_source": peak_source,
        "cases": [],
    }
    code = 0
    for seq_len, batch_size in args.cases:
        kept = num_kept_tokens(seq_len, args.keep_ratio)
        contenders[1].kept_tokens = kept
        for c in contenders:  # the trainer's static prediction width P, where the model has it
            c.prediction_width = max_predictions(seq_len) if static_width else None
        started = time.perf_counter()
        try:
            case = bench_case(contenders, seq_len, batch_size, args, cfg, device)
        except Exception as e:  # noqa: BLE001 - reported, then the next case
            line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            message = f"{type(e).__name__}: {line}"[:400]
            print(f"bench_gpu: error: {seq_len}x{batch_size}: {message}", file=sys.stderr)
            report["cases"].append({"seq_len": seq_len, "batch_size": batch_size, "error": message})
            code = 1
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        case["wall_s"] = time.perf_counter() - started
        report["cases"].append(case)
        print(f"bench_gpu: {seq_len}x{batch_size} done in {case['wall_s']:.1f} s", file=sys.stderr)
    good = {"cases": [c for c in report["cases"] if "error" not in c]}
    if good["cases"]:
        print_table(good)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"bench_gpu: wrote {args.json}", file=sys.stderr)
    if engine == "deepspeed":
        from pretrain import distributed

        distributed.shutdown()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
