"""The whole Router Upcycling pipeline in miniature, on CPU, in about ten minutes on two cores:

  1. corpus      code / prose / math from the Python standard library (examples/quickstart/corpus.py)
  2. dense       a byte-level BPE tokenizer and a small dense Qwen2 model, trained from scratch
  3. data        tools/preprocess_data.py: the training set as a megatron indexed dataset
  4. upcycle     tools/convert_checkpoint.py upcycle, twice: vanilla (random linear router) and Router
                 Upcycling (Mixture-of-Routers from attention, calibrated on the corpus); then `verify`
  5. train       python -m router_upcycling.train under torchrun (2 ranks): same data, steps and seed
  6. export      tools/convert_checkpoint.py export --format mor
  7. routing     python -m router_upcycling.analyze routing, per domain, on both exports
  8. evaluate    held-out loss, perplexity and next-token accuracy per domain (examples/quickstart/evaluate.py)
  9. report      OUTPUT/report.md with the loss curves, routing heatmaps and tables

    python -m examples.quickstart.run --output runs/quickstart             # the demo (`make demo`)
    python -m examples.quickstart.run --output runs/quickstart --seeds 1 2 3   # + continued training with 3 seeds
    python -m examples.quickstart.run --output runs/smoke --smoke          # tiny sizes, about a minute

Every stage skips when its output exists, so an interrupted run resumes where it stopped (training
resumes from its last checkpoint); --fresh starts over. Outputs are written beside their destination
and renamed into place, so a stage's folder exists only when the stage finished.
"""
import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from examples.quickstart.corpus import DOMAINS, VALID_PERCENT, CorpusSizes, build_corpus
from examples.quickstart.pretrain_dense import DenseSettings
from router_upcycling.cli import user_errors
from router_upcycling.errors import UserError
from router_upcycling.outputs import staged_output
from router_upcycling.settings.routers import BASELINE_ROUTER, DEFAULT_ROUTER, get_router

REPO_ROOT = Path(__file__).resolve().parents[2]
SETTINGS_FILE = "quickstart.json"
ROUTERS = {"vanilla": BASELINE_ROUTER, "mor": DEFAULT_ROUTER}  # run name -> upcycle --router


@dataclass(frozen=True)
class RunSpec:
    """One upcycled MoE run: its router and what its upcycle and training add to the demo's settings."""

    name: str
    router: str
    upcycle_flags: tuple = ()
    train_flags: tuple = ()
    dense: str = "dense"  # the dense model's folder under the output folder

    @property
    def seeded_init(self) -> bool:
        """Random routers differ per seed; the Mixture-of-Routers init is deterministic."""
        return not get_router(self.router).needs_calibration


DEMO_RUNS = {name: RunSpec(name, router) for name, router in ROUTERS.items()}


# the command-line tools the pipeline calls, as a user would type them
TOOLS = {"convert": ["python", "tools/convert_checkpoint.py"], "preprocess": ["python", "tools/preprocess_data.py"],
         "analyze": ["python", "-m", "router_upcycling.analyze"]}


class QuickstartError(UserError):
    """A stage failed or the output folder does not fit this run."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of every stage. The MoE runs train on sequences of dense.seq_length tokens."""

    corpus: CorpusSizes = field(default_factory=CorpusSizes)
    dense: DenseSettings = field(default_factory=DenseSettings)
    num_experts: int = 8
    topk: int = 2
    calib_tokens: int = 32768
    train_iters: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 16
    lr: float = 1e-3
    lr_warmup_iters: int = 20
    log_interval: int = 5
    eval_interval: int = 50
    eval_iters: int = 4
    nproc: int = 2
    analysis_tokens: int = 4096
    eval_tokens: int = 8192


SMOKE = DemoSettings(
    corpus=CorpusSizes(train_chars=20_000, heldout_chars=3_000),
    dense=DenseSettings(vocab_size=384, hidden_size=64, num_layers=2, num_heads=8, intermediate_size=224,
                        seq_length=64, batch_size=8, steps=10, warmup_steps=2),
    calib_tokens=1024, train_iters=4, micro_batch_size=4, global_batch_size=8, lr_warmup_iters=1,
    log_interval=1, eval_interval=2, eval_iters=1, analysis_tokens=256, eval_tokens=256,
)


class Layout:
    """Where every stage writes, under the output folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.corpus = root / "corpus"
        self.train_jsonl = self.corpus / "train.jsonl"
        self.dense = root / "dense"
        self.data = root / "data"
        self.data_prefix = self.data / "corpus_text_document"
        self.evaluation = root / "evaluation.json"
        self.timings = root / "timings.json"
        self.commands = root / "commands.json"
        self.report = root / "report.md"

    def heldout(self, domain: str) -> Path:
        return self.corpus / "heldout" / f"{domain}.jsonl"

    def upcycled(self, name: str, seed: int) -> Path:
        # the Mixture-of-Routers init is deterministic; random routers are drawn from the seed
        run = DEMO_RUNS.get(name) or RunSpec(name, BASELINE_ROUTER)
        return self.upcycled_run(run, seed)

    def upcycled_run(self, run: RunSpec, seed: int) -> Path:
        return self.root / "upcycled" / (f"{run.name}-seed{seed}" if run.seeded_init else run.name)

    def verify_log(self, name: str, seed: int) -> Path:
        return self.upcycled(name, seed).with_name(self.upcycled(name, seed).name + ".verify.txt")

    def trained(self, name: str, seed: int) -> Path:
        return self.root / "train" / f"seed{seed}" / name

    def exported(self, name: str) -> Path:
        return self.root / "hf" / name

    def routing(self, name: str) -> Path:
        return self.root / "routing" / name


def subprocess_env() -> Dict[str, str]:
    """Offline, and without megatron-core's import-time warnings drowning the progress lines."""
    return {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


class Pipeline:
    """Runs the stages in order, each one only when its output is missing, with a timed line per stage."""

    def __init__(self, layout: Layout, settings: DemoSettings, seeds: Sequence[int]) -> None:
        self.layout, self.settings, self.seeds = layout, settings, list(seeds)
        self.started = time.time()
        self.timings: Dict[str, float] = self._read_json(layout.timings)
        self.commands: Dict[str, str] = self._read_json(layout.commands)

    @staticmethod
    def _read_json(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_json(self, path: Path, value: dict) -> None:
        path.with_suffix(".tmp").write_text(json.dumps(value, indent=2) + "\n")
        os.replace(path.with_suffix(".tmp"), path)

    def stage(self, name: str, done: Callable[[], bool], action: Callable[[], None]) -> None:
        elapsed = f"[{time.time() - self.started:6.1f} s]"
        if done():
            print(f"{elapsed} {name}: done before, skipped", flush=True)
            return
        print(f"{elapsed} {name} ...", flush=True)
        start = time.time()
        action()
        self.timings[name] = round(time.time() - start, 1)
        self._write_json(self.layout.timings, self.timings)
        print(f"[{time.time() - self.started:6.1f} s] {name}: done in {self.timings[name]:.1f} s", flush=True)

    def record(self, name: str, command: List[str]) -> None:
        """Keep the command line a user would type for this step (the report lists them)."""
        self.commands[name] = " ".join(command)
        self._write_json(self.layout.commands, self.commands)

    def call(self, name: str, tool: str, argv: List[str], capture: Optional[Path] = None,
             shown_argv: Optional[List[str]] = None) -> None:
        """Run a command-line tool's main(argv) in this process (imports are paid once), its progress bars on
        our terminal; a failure stops the pipeline with a one-line error. capture: also save its stdout there;
        shown_argv: the arguments to record when argv names a temporary folder."""
        self.record(name, [*TOOLS[tool], *(shown_argv or argv)])
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output) if capture else contextlib.nullcontext():
                status = tool_main(tool)(argv) or 0
        except SystemExit as stop:
            if isinstance(stop.code, str):  # sys.exit("error: ...") prints only when it reaches the interpreter
                print(stop.code, file=sys.stderr)
            status = stop.code if isinstance(stop.code, int) else 1
        if capture:
            print(output.getvalue(), end="", flush=True)
        if status != 0:
            raise QuickstartError(f"stage {name!r} failed (exit status {status}; its output is above); "
                                  "fix the cause and rerun the same command to resume")
        if capture:
            capture.write_text(output.getvalue())

    def launch(self, name: str, command: List[str], shown_command: List[str]) -> None:
        """Run a command in a child process (training needs its own processes, one per rank)."""
        self.record(name, shown_command)
        process = subprocess.Popen(command, env=subprocess_env(), cwd=REPO_ROOT)
        try:
            returncode = process.wait()
        finally:
            if process.poll() is None:  # we are being stopped: stop the training too (it checkpoints on SIGTERM)
                process.terminate()
                process.wait()
        if returncode != 0:
            raise QuickstartError(f"stage {name!r} failed (exit status {returncode}; its output is above); "
                                  "fix the cause and rerun the same command to resume")

    # --- stages ---------------------------------------------------------------------------------

    def corpus(self) -> None:
        def build() -> None:
            with staged_output(str(self.layout.corpus), force=False) as staging:
                stats = build_corpus(staging, self.settings.corpus, seed=0)
            for domain, counts in stats.items():
                print(f"  {domain:5s}: {counts['train_documents']:5d} training documents ({counts['train_chars']:,} characters), "
                      f"{counts['heldout_documents']} held out", flush=True)
        self.stage("corpus", self.layout.corpus.is_dir, build)

    def dense(self) -> None:
        from examples.quickstart.pretrain_dense import pretrain_dense

        self.stage("dense", self.layout.dense.is_dir,
                   lambda: pretrain_dense(str(self.layout.train_jsonl), str(self.layout.dense), self.settings.dense, seed=0))

    def data(self) -> None:
        def preprocess() -> None:
            argv = ["--input", str(self.layout.train_jsonl), "--tokenizer-model", str(self.layout.dense), "--no-progress"]
            with staged_output(str(self.layout.data), force=False) as staging:
                self.call("data", "preprocess", [*argv, "--output-prefix", os.path.join(staging, "corpus")],
                          shown_argv=[*argv, "--output-prefix", str(self.layout.data / "corpus")])
        self.stage("data", self.layout.data.is_dir, preprocess)

    def upcycle(self, name: str, seed: int, run: Optional[RunSpec] = None) -> None:
        run = run or DEMO_RUNS[name]
        output = self.layout.upcycled_run(run, seed)
        dense = self.layout.root / run.dense
        command = ["upcycle", "--hf-model", str(dense),
                   "--output", str(output), "--router", run.router, "--num-experts", str(self.settings.num_experts),
                   "--topk", str(self.settings.topk), "--dtype", "fp32", "--seed", str(seed)]
        if get_router(run.router).needs_calibration:
            command += ["--calib-data", str(self.layout.train_jsonl), "--calib-tokens", str(self.settings.calib_tokens),
                        "--calib-seq-length", str(self.settings.dense.seq_length), "--calib-batch-size", "32"]
        command += list(run.upcycle_flags)  # later flags win in argparse
        self.stage(f"upcycle {output.name}", output.is_dir, lambda: self.call(f"upcycle {output.name}", "convert", command))
        verify = ["verify", "--hf-model", str(dense),
                  "--checkpoint", str(output), "--seq-length", str(self.settings.dense.seq_length)]
        log = output.with_name(output.name + ".verify.txt")
        self.stage(f"verify {output.name}", log.is_file, lambda: self.call(f"verify {output.name}", "convert", verify, capture=log))

    def train(self, name: str, seed: int, run: Optional[RunSpec] = None) -> None:
        run = run or DEMO_RUNS[name]
        save = self.layout.trained(name, seed)
        s = self.settings
        flags = ["--pretrained-checkpoint", str(self.layout.upcycled_run(run, seed)), "--load", str(save), "--save", str(save),
                 "--data-path", str(self.layout.data_prefix), "--data-cache-path", str(self.layout.data / "cache"),
                 "--split", f"{100 - VALID_PERCENT},{VALID_PERCENT},0", "--seq-length", str(s.dense.seq_length), "--micro-batch-size", str(s.micro_batch_size),
                 "--global-batch-size", str(s.global_batch_size), "--train-iters", str(s.train_iters), "--lr", str(s.lr),
                 "--lr-warmup-iters", str(s.lr_warmup_iters), "--seed", str(seed), "--log-interval", str(s.log_interval),
                 "--eval-interval", str(s.eval_interval), "--eval-iters", str(s.eval_iters), *run.train_flags]
        torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(s.nproc)] if s.nproc > 1 else []
        command = ["-m", "router_upcycling.train", *flags]

        def run_training() -> None:
            if save.is_dir() and not (save / "latest_checkpointed_iteration.txt").is_file():
                shutil.rmtree(save)  # stopped before its first checkpoint: nothing to resume, start clean
            shown = ["torchrun", *torchrun[2:]] if torchrun else ["python"]
            self.launch(f"train {name} seed {seed}", [sys.executable, *torchrun, *command], [*shown, *command])

        self.stage(f"train {name} (seed {seed})", lambda: trained_iterations(save) >= s.train_iters, run_training)

    def export(self, name: str) -> None:
        output = self.layout.exported(name)
        command = ["export", "--checkpoint",
                   str(self.layout.trained(name, self.seeds[0])), "--output", str(output), "--format", "mor", "--dtype", "fp32"]
        self.stage(f"export {name}", output.is_dir, lambda: self.call(f"export {name}", "convert", command))

    def routing(self, name: str) -> None:
        output = self.layout.routing(name)
        command = ["routing", "--model", str(self.layout.exported(name)),
                   "--output", str(output), "--seq-length", str(self.settings.dense.seq_length),
                   "--max-tokens", str(self.settings.analysis_tokens), "--batch-size", "16", "--device", "cpu"]
        command += [arg for domain in DOMAINS for arg in ("--domain", f"{domain}={self.layout.heldout(domain)}")]
        output.parent.mkdir(parents=True, exist_ok=True)
        self.stage(f"routing {name}", output.is_dir, lambda: self.call(f"routing {name}", "analyze", command))

    def evaluate(self) -> None:
        from examples.quickstart.evaluate import evaluate_model

        def run_evaluation() -> None:
            heldout = {domain: str(self.layout.heldout(domain)) for domain in DOMAINS}
            models = {"dense (before upcycling)": self.layout.dense, **{n: self.layout.exported(n) for n in ROUTERS}}
            results = {}
            for label, folder in models.items():
                results[label] = evaluate_model(str(folder), heldout, self.settings.dense.seq_length, self.settings.eval_tokens)
                print(f"  {label}: " + ", ".join(f"{d} loss {r['loss']:.3f} acc {100 * r['accuracy']:.1f}%"
                                                 for d, r in results[label].items()), flush=True)
            self._write_json(self.layout.evaluation, results)
        self.stage("evaluate", self.layout.evaluation.is_file, run_evaluation)

    def report(self) -> None:
        from examples.quickstart.report import write_quickstart_report

        start = time.time()
        write_quickstart_report(self.layout, self.settings, self.seeds, self.timings, self.commands)
        print(f"[{time.time() - self.started:6.1f} s] report: wrote {self.layout.report} in {time.time() - start:.1f} s", flush=True)

    def run(self) -> None:
        main_seed = self.seeds[0]
        self.corpus()
        self.dense()
        self.data()
        for name in ROUTERS:
            self.upcycle(name, main_seed)
        for name in ROUTERS:
            self.train(name, main_seed)
        for name in ROUTERS:
            self.export(name)
        for name in ROUTERS:
            self.routing(name)
        self.evaluate()
        for seed in self.seeds[1:]:
            self.upcycle("vanilla", seed)
            for name in ROUTERS:
                self.train(name, seed)
        self.report()


TOOL_MODULES = {"convert": "router_upcycling.commands.convert", "preprocess": "router_upcycling.commands.preprocess",
                "analyze": "router_upcycling.analyze.__main__"}  # what the TOOLS command lines run


def tool_main(tool: str) -> Callable[[List[str]], Optional[int]]:
    """The main(argv) of a command-line tool (tools/*.py are thin wrappers around these modules)."""
    return importlib.import_module(TOOL_MODULES[tool]).main


def trained_iterations(save: Path) -> int:
    """The last complete checkpoint's iteration in a training --save folder (0 when there is none)."""
    tracker = save / "latest_checkpointed_iteration.txt"
    text = tracker.read_text().strip() if tracker.is_file() else ""
    return int(text) if text.isdigit() else 0


def settings_record(settings: DemoSettings) -> dict:
    return json.loads(json.dumps(asdict(settings)))


def prepare_output(root: Path, settings: DemoSettings, fresh: bool) -> None:
    """Create the output folder, or check that an existing one was made with the same settings."""
    marker = root / SETTINGS_FILE
    if root.exists() and not root.is_dir():
        raise QuickstartError(f"--output {root} is a file")
    if root.is_dir() and any(root.iterdir()) and not marker.is_file():
        raise QuickstartError(f"--output {root} holds files that are not a quickstart run; choose another folder")
    if fresh and root.is_dir():
        shutil.rmtree(root)
    if marker.is_file():
        if json.loads(marker.read_text()) != settings_record(settings):
            raise QuickstartError(f"{root} was made with other settings (--smoke or --train-iters differ); "
                                  "pass --fresh to start over or choose another --output")
        return
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings_record(settings), indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.quickstart.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/quickstart", help="folder for every stage's output and report.md "
                        "(default runs/quickstart)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (about a minute): checks that "
                        "the pipeline works, says nothing about the method")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds of the continued-training stage; the "
                        "first gets the full pipeline, the others train both runs again and add a mean ± std table "
                        "(default: 1)")
    parser.add_argument("--train-iters", type=int, help="continued-training steps of each MoE run (default 300; smoke 4)")
    parser.add_argument("--nproc", type=int, help="data-parallel training processes (default 2)")
    parser.add_argument("--fresh", action="store_true", help="delete the output folder of an earlier quickstart run "
                        "and start over (default: resume, skipping finished stages)")
    return parser


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    settings = SMOKE if args.smoke else DemoSettings()
    if args.train_iters is not None:
        if args.train_iters < 1:
            raise QuickstartError("--train-iters must be at least 1")
        settings = replace(settings, train_iters=args.train_iters)
    if args.nproc is not None:
        if args.nproc < 1 or settings.global_batch_size % (args.nproc * settings.micro_batch_size):
            raise QuickstartError(f"--nproc must divide the global batch {settings.global_batch_size} into micro-batches "
                                  f"of {settings.micro_batch_size}")
        settings = replace(settings, nproc=args.nproc)
    return settings


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    # a plain `kill` must unwind like Ctrl-C so that a running training is stopped with us, not orphaned
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with user_errors():
        if len(set(args.seeds)) != len(args.seeds):
            raise QuickstartError("--seeds must be distinct")
        settings = settings_from_args(args)
        root = Path(args.output).resolve()
        prepare_output(root, settings, args.fresh)
        print(f"quickstart: {'smoke' if args.smoke else 'demo'} run into {root}, seeds {args.seeds}", flush=True)
        Pipeline(Layout(root), settings, args.seeds).run()
        print(f"report: {root / 'report.md'}", flush=True)


if __name__ == "__main__":
    main()
