"""`python -m router_upcycling.selfcheck`: flags, the order of the stages, and how a torchrun job splits them.

Run plainly, every stage runs in this process on one device. Under torchrun (or launch.sh) with several processes,
rank 0 first runs the one-process stages (parity, calibration, throughput on one GPU) in a child process of its
own, a world of one, while the other ranks wait; then every rank times the training steps together (data
parallel over all GPUs of the job), and rank 0 writes one report holding both.
"""
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from router_upcycling.cli import OneLineErrorParser, user_errors
from router_upcycling.errors import UserError
from router_upcycling.mcore.parallel import device_type
from router_upcycling.outputs import refuse_existing, staged_output
from router_upcycling.selfcheck.sizes import SIZES

STAGES = ("parity", "calibration", "throughput")
WAIT_FOR_ONE_PROCESS_STAGES = datetime.timedelta(hours=4)


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="python -m router_upcycling.selfcheck",
        description="Check that this toolkit computes correctly on this machine and measure its speed here: parity of "
        "the router and a tiny upcycled model against CPU float32, the calibration pass, and training steps of the "
        "8x0.5B recipe. Writes OUTPUT/selfcheck.json and OUTPUT/selfcheck.md (a table to paste into an issue); exits "
        "with status 1 when a parity check fails. Under torchrun it also times the steps on every GPU of the job. "
        "Figures and targets: docs/performance.md.",
    )
    add = parser.add_argument
    add("--output", required=True, help="folder for selfcheck.json and selfcheck.md (written when every stage has run)")
    add("--force", action="store_true", help="replace --output if it exists")
    add("--device", choices=("cuda", "cpu"), help="where to run: cuda (default where a GPU is visible) or cpu "
        "(hides the GPUs from this run)")
    add("--size", choices=tuple(SIZES), help="model to time: 0.5b (Qwen1.5-0.5B's shape, the paper's 8x0.5B; default "
        "on cuda), 1.8b (Qwen1.5-1.8B's shape) or tiny (default on cpu); parity always uses a tiny model")
    add("--steps", type=int, help="timed training rounds, one step of every configuration each (default 10 on a GPU, "
        "30 on a CPU, whose step times vary more from one step to the next)")
    add("--warmup", type=int, default=3, help="untimed training steps before them (default 3)")
    add("--stages", nargs="+", choices=STAGES, default=list(STAGES), metavar="STAGE",
        help=f"stages to run, of {', '.join(STAGES)} (default: all three)")
    add("--peak-flops", type=float, help="peak FLOP/s per device for the MFU (default: H100 bf16 989e12 on CUDA; "
        "no MFU on CPU unless given), as python -m router_upcycling.train")
    return parser


def parse_args(argv: List[str]):
    args = build_parser().parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything asks torch about CUDA; children inherit it
    if args.device == "cuda" and device_type() != "cuda":
        raise UserError("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False); "
                        "run on a GPU node or pass --device cpu")
    args.device = device_type()
    args.size = args.size or ("0.5b" if args.device == "cuda" else "tiny")
    if args.steps is None:
        args.steps = 10 if args.device == "cuda" else 30
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be at least 1 and --warmup at least 0")
    refuse_existing(args.output, args.force)
    return args


STARTED = time.monotonic()


def say(line: str) -> None:
    print(f"selfcheck {time.monotonic() - STARTED:6.1f} s | {line}", flush=True)


def stage_reporter(stage: str, is_writer: bool = True):
    return (lambda line: say(f"{stage}: {line}")) if is_writer else (lambda line: None)


def describe_model(size_name: str) -> str:
    c = SIZES[size_name].hf_config
    return (f"{size_name}: d {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, FFN "
            f"{c['intermediate_size']}, vocab {c['vocab_size']}; 8 experts top-2, 8 Mixture-of-Routers routers")


def one_process_stages(args, command: str) -> dict:
    """Parity, calibration speed and training steps on this process's one device."""
    from router_upcycling.mcore.parallel import device_description, initialize_distributed
    from router_upcycling.selfcheck import report
    from router_upcycling.selfcheck.parity import run_parity
    from router_upcycling.selfcheck.speed import calibration_speed, throughput

    initialize_distributed(seed=0)
    result = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device_description(), "versions": report.versions(), "size": args.size,
              "model": describe_model(args.size)}
    versions = result["versions"]
    say(f"{args.device} ({result['device']['name']}), torch {versions['torch']}, megatron-core "
        f"{versions['megatron_core']}; stages {', '.join(args.stages)}")
    size = SIZES[args.size]
    if "parity" in args.stages:
        say("parity: a tiny upcycled model on this device against CPU float32")
        with tempfile.TemporaryDirectory(prefix="selfcheck-") as workdir:
            result["parity"] = [check.to_dict() for check in run_parity(workdir, stage_reporter("parity"))]
    if "calibration" in args.stages:
        say(f"calibration: the average-key pass, {result['model']}")
        result["calibration"] = figures = calibration_speed(size)
        say(f"calibration: {figures['tokens']:,} tokens in {figures['seconds']:.2f} s, {figures['tokens_per_sec']:,.0f} "
            f"tokens/s (the paper's {figures['paper_tokens']:,} tokens: {figures['paper_tokens_minutes']:,.1f} min)")
    if "throughput" in args.stages:
        say(f"throughput: {args.steps} training steps per configuration after {args.warmup}, {result['model']}")
        result["throughput"] = [throughput(size, args.steps, args.warmup, args.peak_flops, stage_reporter("throughput"))]
    return report.finish(result)


def child_command(args, output: str) -> List[str]:
    flags = ["--device", args.device, "--size", args.size, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--stages", *args.stages, "--output", output]
    if args.peak_flops:
        flags += ["--peak-flops", str(args.peak_flops)]
    return [sys.executable, "-m", "router_upcycling.selfcheck", *flags]


def stages_under_torchrun(args, command: str) -> Optional[dict]:
    """Every rank: the one-process stages in rank 0's child, then data-parallel steps on all ranks. Rank 0 returns
    the merged result, the others None."""
    import torch.distributed as dist

    from router_upcycling.mcore.parallel import initialize_distributed, single_process_env
    from router_upcycling.selfcheck import report
    from router_upcycling.selfcheck.speed import throughput

    initialize_distributed(seed=0)
    is_writer = dist.get_rank() == 0
    waiting = dist.new_group(backend="gloo", timeout=WAIT_FOR_ONE_PROCESS_STAGES)  # NCCL's watchdog would give up
    one_process, status = None, [0]
    if is_writer:
        say(f"{dist.get_world_size()} processes: the one-process stages first, in a child process on this node")
        with tempfile.TemporaryDirectory(prefix="selfcheck-") as folder:
            output = os.path.join(folder, "one-process")
            status = [subprocess.run(child_command(args, output), env=single_process_env()).returncode]
            if status[0] in (0, 1):
                with open(os.path.join(output, "selfcheck.json")) as f:
                    one_process = json.load(f)
    dist.broadcast_object_list(status, src=0, group=waiting)
    if status[0] not in (0, 1):  # the child printed why; every rank stops alike
        raise SystemExit(f"error: the one-process stages stopped with exit status {status[0]}; their output above says why")
    runs = []
    if "throughput" in args.stages:
        stage_reporter("throughput", is_writer)(f"{args.steps} training steps per configuration on all "
                                                f"{dist.get_world_size()} processes")
        runs.append(throughput(SIZES[args.size], args.steps, args.warmup, args.peak_flops,
                               stage_reporter("throughput", is_writer)))
    if not is_writer:
        return None
    one_process["throughput"] = (one_process.get("throughput") or []) + runs
    return report.finish({**one_process, "command": command})


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with user_errors():
        args = parse_args(argv)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        command = shlex.join(["python", "-m", "router_upcycling.selfcheck", *argv])
        if world_size > 1:
            command = f"torchrun [{world_size} processes] {command.removeprefix('python ')}"
            result = stages_under_torchrun(args, command)
        else:
            result = one_process_stages(args, command)
        if result is None:
            return
        from router_upcycling.selfcheck.report import write

        with staged_output(args.output, args.force) as staging:
            write(staging, result)
        say(summary(result))
        say(f"wrote {os.path.join(args.output, 'selfcheck.json')} and selfcheck.md")
    if not result["ok"]:
        sys.exit(1)


def summary(result: dict) -> str:
    verdict = {True: "parity OK", False: "parity FAILED", None: "parity not run"}[result["parity_ok"]]
    parts = [verdict]
    if result["tokens_per_sec"] is not None:
        parts.append(f"{result['tokens_per_sec']:,.0f} tokens/s per GPU on {result['throughput_world_size']} process(es)")
    if result["mor_over_linear"] is not None:
        parts.append(f"MoR / linear {result['mor_over_linear']:.3f}")
    return " | ".join(parts)
