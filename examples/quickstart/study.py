"""Why Router Upcycling trails vanilla upcycling in the quickstart: routing health and an ablation study; and how
to initialise it on grouped-query attention and QK-norm models.

    python -m examples.quickstart.study --output runs/study --seeds 1 2 3
    python -m examples.quickstart.study --backbone gqa --output runs/study-gqa       # 8 heads, 2 KV heads
    python -m examples.quickstart.study --backbone qwen3 --output runs/study-qwen3   # Qwen3: QK-norm, 2 KV heads

The backbone is the dense model (the quickstart's shape: d 128, 4 layers, 8 heads of 16): `mha` (the quickstart's
own, multi-head attention), `gqa` (the same with 2 key/value heads) or `qwen3` (Qwen3's architecture: per-head
QK-norm, no biases, 2 key/value heads). Each has its own runs (below) and its own block in docs/results.md.

Builds the quickstart's corpus, dense model and data (examples/quickstart/run.py, same settings), then
trains every run below for every seed with the demo's continued-training recipe (300 steps, 2 ranks) and
writes OUTPUT/study.md and OUTPUT/study.json:

- routing health (`python -m router_upcycling.analyze health`) of the vanilla and Mixture-of-Routers
  models at step 0 (their upcycled checkpoints, exported) and, from the training records, during training;
- the ablation table: for each variant, the final validation loss of Router Upcycling minus that of the
  vanilla run it is paired with (same seed, same data order, same training settings), mean ± std over seeds.

Every stage skips when its output exists, so a stopped study resumes; --only NAME... trains a subset;
--docs FILE also puts the report between FILE's study markers (docs/results.md has them).
"""
import argparse
import json
import re
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

from examples.quickstart.corpus import DOMAINS
from examples.quickstart.pretrain_dense import DenseSettings
from examples.quickstart.run import DemoSettings, Layout, Pipeline, QuickstartError, RunSpec, prepare_output
from router_upcycling.cli import user_errors
from router_upcycling.outputs import write_text_atomic
from router_upcycling.routing_stats import HEALTH_KEYS
from router_upcycling.settings.routers import BASELINE_ROUTER, DEFAULT_ROUTER

LONG_DENSE_STEPS = 4 * DenseSettings().steps
MATCHED = "matched"  # placeholder for the router scale that matches vanilla's initial logit std
BACKBONES = {
    "mha": DenseSettings(),
    "gqa": replace(DenseSettings(), num_kv_heads=2),
    "qwen3": replace(DenseSettings(), num_kv_heads=2, family="qwen3"),
}
BACKBONE = "mha"  # the study's backbone, set by --backbone before anything runs


def runs() -> Dict[str, RunSpec]:
    """Every trained run of the backbone."""
    return mha_runs() if BACKBONE == "mha" else gqa_runs()


def gqa_runs() -> Dict[str, RunSpec]:
    """Grouped-query backbones: the paper's construction (whose experts start tied) against the router inits that give
    every expert its own keys, with the MHA study's two findings (router scale, max aggregation) re-checked on the
    `query` init (on gqa also the `perturb` init); on Qwen3 also the routers' queries and keys taken after the per-head norm,
    and the routers that apply the query norm themselves."""
    specs = [
        RunSpec("vanilla", BASELINE_ROUTER),
        RunSpec("mor", DEFAULT_ROUTER, upcycle_flags=("--router-init", "paper")),
        RunSpec("mor-query", DEFAULT_ROUTER, upcycle_flags=("--router-init", "query")),
        RunSpec("mor-perturb", DEFAULT_ROUTER, upcycle_flags=("--router-init", "perturb")),
        RunSpec("mor-query-scale-inv-sqrt-dr", DEFAULT_ROUTER, upcycle_flags=("--router-init", "query", "--router-scale", "0.25")),
        RunSpec("mor-query-max", DEFAULT_ROUTER, upcycle_flags=("--router-init", "query", "--router-aggregation", "max")),
    ]
    if BACKBONE == "gqa":  # where perturb beat query at the paper's scoring: the two findings on it too
        specs += [RunSpec("mor-perturb-scale-inv-sqrt-dr", DEFAULT_ROUTER,
                          upcycle_flags=("--router-init", "perturb", "--router-scale", "0.25")),
                  RunSpec("mor-perturb-max", DEFAULT_ROUTER,
                          upcycle_flags=("--router-init", "perturb", "--router-aggregation", "max"))]
    if BACKBONE == "qwen3":
        specs += [RunSpec("mor-query-qk-after", DEFAULT_ROUTER, upcycle_flags=("--router-init", "query", "--router-qk-norm", "after")),
                  RunSpec("mor-perturb-qk-after", DEFAULT_ROUTER, upcycle_flags=("--router-init", "perturb", "--router-qk-norm", "after")),
                  RunSpec("mor-query-qk-inside", DEFAULT_ROUTER, upcycle_flags=("--router-init", "query", "--router-qk-norm", "inside")),
                  RunSpec("mor-perturb-qk-inside", DEFAULT_ROUTER, upcycle_flags=("--router-init", "perturb", "--router-qk-norm", "inside"))]
    return {spec.name: spec for spec in specs}


GQA_ROWS = {
    "paper construction (average keys: experts tied)": ("mor", "vanilla"),
    "router init query (average queries)": ("mor-query", "vanilla"),
    "router init perturb (ties broken)": ("mor-perturb", "vanilla"),
    "query init, router logit scale 1/sqrt(d_r) = 0.25": ("mor-query-scale-inv-sqrt-dr", "vanilla"),
    "query init, max aggregation": ("mor-query-max", "vanilla"),
    "perturb init, router logit scale 1/sqrt(d_r) = 0.25": ("mor-perturb-scale-inv-sqrt-dr", "vanilla"),
    "perturb init, max aggregation": ("mor-perturb-max", "vanilla"),
    "query init, queries and keys after the QK-norm": ("mor-query-qk-after", "vanilla"),
    "perturb init, queries and keys after the QK-norm": ("mor-perturb-qk-after", "vanilla"),
    "query init, the query norm inside the routers": ("mor-query-qk-inside", "vanilla"),
    "perturb init, the query norm inside the routers": ("mor-perturb-qk-inside", "vanilla"),
}


def mha_runs() -> Dict[str, RunSpec]:
    """Every trained run. MoR's router dim in the quickstart is d_r = 128 / 8 = 16 (R = 8), 32 with R = 4."""
    specs = [
        RunSpec("vanilla", BASELINE_ROUTER),
        RunSpec("mor", DEFAULT_ROUTER),
        RunSpec("mor-scale-inv-sqrt-dr", DEFAULT_ROUTER, upcycle_flags=("--router-scale", "0.25")),
        RunSpec("mor-scale-matched", DEFAULT_ROUTER, upcycle_flags=("--router-scale", MATCHED)),
        RunSpec("vanilla-aux-0.001", BASELINE_ROUTER, train_flags=("--moe-aux-loss-coeff", "0.001")),
        RunSpec("mor-aux-0.001", DEFAULT_ROUTER, train_flags=("--moe-aux-loss-coeff", "0.001")),
        RunSpec("vanilla-aux-0.1", BASELINE_ROUTER, train_flags=("--moe-aux-loss-coeff", "0.1")),
        RunSpec("mor-aux-0.1", DEFAULT_ROUTER, train_flags=("--moe-aux-loss-coeff", "0.1")),
        RunSpec("vanilla-zloss", BASELINE_ROUTER, train_flags=("--moe-z-loss-coeff", "1e-3")),
        RunSpec("mor-zloss", DEFAULT_ROUTER, train_flags=("--moe-z-loss-coeff", "1e-3")),
        RunSpec("mor-calib-small", DEFAULT_ROUTER, upcycle_flags=("--calib-tokens", "4096")),
        RunSpec("mor-calib-4x", DEFAULT_ROUTER, upcycle_flags=("--calib-tokens", "131072")),
        RunSpec("mor-r4", DEFAULT_ROUTER, upcycle_flags=("--num-routers", "4")),
        RunSpec("mor-max", DEFAULT_ROUTER, upcycle_flags=("--router-aggregation", "max")),
        RunSpec("vanilla-long-dense", BASELINE_ROUTER, dense="dense-long"),
        RunSpec("mor-long-dense", DEFAULT_ROUTER, dense="dense-long"),
    ]
    return {spec.name: spec for spec in specs}


# table row -> (Router Upcycling run, vanilla run it is paired with)
MHA_ROWS = {
    "paper setting (scale 1, aux 0.01, R = 8, sum, 32,768 calibration tokens)": ("mor", "vanilla"),
    "router logit scale 1/sqrt(d_r) = 0.25": ("mor-scale-inv-sqrt-dr", "vanilla"),
    "router logit scale matched to vanilla's initial logit std": ("mor-scale-matched", "vanilla"),
    "--moe-aux-loss-coeff 0.001 (both runs)": ("mor-aux-0.001", "vanilla-aux-0.001"),
    "--moe-aux-loss-coeff 0.1 (both runs)": ("mor-aux-0.1", "vanilla-aux-0.1"),
    "--moe-z-loss-coeff 1e-3 (both runs)": ("mor-zloss", "vanilla-zloss"),
    "calibration: 4,096 tokens (1/8)": ("mor-calib-small", "vanilla"),
    "calibration: 131,072 tokens (4x)": ("mor-calib-4x", "vanilla"),
    "R = 4 routers": ("mor-r4", "vanilla"),
    "max aggregation": ("mor-max", "vanilla"),
    f"dense model trained 4x longer ({LONG_DENSE_STEPS} steps), both runs": ("mor-long-dense", "vanilla-long-dense"),
}


def rows() -> Dict[str, tuple]:
    return MHA_ROWS if BACKBONE == "mha" else GQA_ROWS


class Study(Pipeline):
    """The quickstart's stages, plus the long dense model, every run, step-0 health and the table."""

    def long_dense(self) -> None:
        from examples.quickstart.pretrain_dense import pretrain_dense

        target = self.layout.root / "dense-long"
        settings = replace(self.settings.dense, steps=LONG_DENSE_STEPS)
        self.stage("dense (4x longer)", target.is_dir,
                   lambda: pretrain_dense(str(self.layout.train_jsonl), str(target), settings, seed=0))
        same = [name for name in ("tokenizer.json", "vocab.json") if (self.layout.dense / name).is_file()]
        if any((target / name).read_bytes() != (self.layout.dense / name).read_bytes() for name in same):
            raise QuickstartError("the long dense model's tokenizer differs from the data's; delete both and rerun")

    def step0_health(self, run: RunSpec, seed: int) -> dict:
        """Routing health of a run's upcycled checkpoint (step 0), on the held-out text of every domain."""
        name = self.layout.upcycled_run(run, seed).name
        export = self.layout.root / "step0" / "hf" / name
        output = self.layout.root / "step0" / "health" / name
        heldout = self.layout.root / "step0" / "heldout.jsonl"
        if not heldout.is_file():
            heldout.parent.mkdir(parents=True, exist_ok=True)
            heldout.write_text("".join(self.layout.heldout(domain).read_text() for domain in DOMAINS))
        command = ["export", "--checkpoint", str(self.layout.upcycled_run(run, seed)), "--output", str(export),
                   "--format", "mor", "--dtype", "fp32"]
        self.stage(f"export {name} (step 0)", export.is_dir, lambda: self.call(f"export {name} step 0", "convert", command))
        command = ["health", "--model", str(export), "--data", str(heldout), "--output", str(output),
                   "--seq-length", str(self.settings.dense.seq_length), "--max-tokens", str(self.settings.analysis_tokens),
                   "--device", "cpu"]
        output.parent.mkdir(parents=True, exist_ok=True)
        self.stage(f"health {name} (step 0)", (output / "health.json").is_file,
                   lambda: self.call(f"health {name} step 0", "analyze", command))
        return json.loads((output / "health.json").read_text())

    def step0_baseline(self) -> Dict[str, dict]:
        """Step-0 health of vanilla and mor for the first seed (the report's table and the matched scale), and on
        grouped-query backbones of every router init (whether experts start tied is what they differ in)."""
        catalogue = runs()
        names = ("vanilla", "mor") if BACKBONE == "mha" else [n for n in catalogue if "scale" not in n and "max" not in n]
        for name in names:  # upcycled already, or now (a stage that is done is skipped)
            self.upcycle(name, self.seeds[0], catalogue[name])
        return {name: self.step0_health(catalogue[name], self.seeds[0]) for name in names}

    def run_one(self, run: RunSpec, seed: int, scale: Optional[float]) -> None:
        if MATCHED in run.upcycle_flags:
            run = replace(run, upcycle_flags=tuple(f"{scale:.6g}" if f == MATCHED else f for f in run.upcycle_flags))
        self.upcycle(run.name, seed, run)
        self.train(run.name, seed, run)

    def report(self) -> None:
        step0 = self.step0_baseline()
        write_study(self.layout.root, self.seeds, list(runs()), matched_scale(step0), step0)

    def run_study(self, selected: List[str]) -> None:
        """Every run of one seed, then the next seed, the table rewritten after each run, so a study stopped
        early still reports every row it reached (vanilla and mor come first: the matched scale and the
        step-0 health need them; the long dense model is trained when its first run needs it)."""
        self.corpus()
        self.dense()
        self.data()
        catalogue = runs()
        order = [name for name in catalogue if name in selected]
        scale, step0 = None, None
        for seed in self.seeds:
            for name in order:
                if catalogue[name].dense == "dense-long":
                    self.long_dense()
                self.run_one(catalogue[name], seed, scale)
                if step0 is None and name == "mor":  # order starts vanilla, mor
                    step0 = self.step0_baseline()
                    scale = matched_scale(step0)
                if step0 is not None:
                    write_study(self.layout.root, self.seeds, selected, scale, step0)


def matched_scale(step0: Dict[str, dict]) -> float:
    """The router scale that gives MoR at step 0 the logit standard deviation of vanilla's random gate
    (ratio of the layer-mean standard deviations)."""
    spread = {name: statistics.mean(layer["logit_std"] for layer in health["routing_health"])
              for name, health in step0.items()}
    return spread["vanilla"] / spread["mor"]


def records(save: Path) -> List[dict]:
    path = save / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def calibration_tokens_used(upcycled: Path) -> Optional[int]:
    """What the upcycled checkpoint's metadata says calibration really used (not the count asked for)."""
    metadata = upcycled / "router_upcycling.json"
    if not metadata.is_file():
        return None
    return (json.loads(metadata.read_text()).get("calibration") or {}).get("tokens")


def final_val_loss(save: Path) -> Optional[float]:
    """Validation loss at the last step; None while the run has not finished."""
    last = DemoSettings().train_iters
    values = [r["val_loss"] for r in records(save) if "val_loss" in r and r["step"] == last]
    return values[-1] if values else None


def health_over_training(save: Path) -> Dict[int, dict]:
    """step -> layer-mean of each routing-health measure, from the training records."""
    curve = {}
    for record in records(save):
        layers = record.get("routing_health")
        if layers:
            # runs recorded before a measure existed lack it (tied_choice)
            curve[record["step"]] = {key: statistics.mean(layer[key] for layer in layers) for key in HEALTH_KEYS
                                     if key in layers[0]}
    return curve


def mean_std(values: List[float]) -> str:
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:+.4f} (1 seed)"
    return f"{statistics.mean(values):+.4f} ± {statistics.stdev(values):.4f}"


# the health-during-training table: the pair, the two scales, and the two variants that act on sharpness
HEALTH_RUNS = ("vanilla", "mor", "mor-scale-inv-sqrt-dr", "mor-scale-matched", "mor-max", "mor-zloss")
HEALTH_STEPS = (5, 50, 150, 300)


def health_cells(layers: List[dict]) -> str:
    """Layer mean (min-max over layers) of each measure."""
    cells = []
    for key in HEALTH_KEYS:
        values = [layer[key] for layer in layers if key in layer]
        cells.append(f"{statistics.mean(values):.3g} ({min(values):.3g}-{max(values):.3g})" if values else "")
    return " | ".join(cells)


def health_tables(result: dict, seeds: List[int]) -> List[str]:
    header = "| " + " | ".join(HEALTH_KEYS) + " |"
    lines = ["## Routing health at step 0 (upcycled checkpoints, seed %d; layer mean (min-max))" % seeds[0], "",
             "| run " + header, "|---|" + "---|" * len(HEALTH_KEYS)]
    for name, health in result["step0_health"].items():
        lines.append(f"| {name} | {health_cells(health['routing_health'])} |")
    lines += ["", "## Routing health during training (layer mean, averaged over the seeds that ran)", "",
              "| run | step " + header, "|---|---|" + "---|" * len(HEALTH_KEYS)]
    for name in (HEALTH_RUNS if BACKBONE == "mha" else list(runs())):
        curves = [result["runs"].get(name, {}).get(seed, {}).get("health") or {} for seed in seeds]
        for step in HEALTH_STEPS:
            points = [curve[step] for curve in curves if step in curve]
            if points:
                cells = " | ".join(f"{statistics.mean(p[key] for p in points):.3g}" if all(key in p for p in points)
                                   else "" for key in HEALTH_KEYS)
                lines.append(f"| {name} ({len(points)} seed{'s' * (len(points) > 1)}) | {step} | {cells} |")
    return lines


REPORT_TITLE = "## Ablation: Router Upcycling minus vanilla upcycling, paired by seed"


def write_study(root: Path, seeds: List[int], selected: List[str], scale: float, step0: Dict[str, dict]) -> None:
    layout = Layout(root)
    table, result = [], {"seeds": seeds, "matched_router_scale": scale, "step0_health": step0, "rows": {}, "runs": {}}
    for name in selected:
        finished = {seed: final_val_loss(layout.trained(name, seed)) for seed in seeds}
        result["runs"][name] = {seed: {"final_val_loss": loss,
                                       "health": health_over_training(layout.trained(name, seed)) if loss is not None else {}}
                                for seed, loss in finished.items()}
    for label, (mor, vanilla) in rows().items():
        if mor not in selected or vanilla not in selected:
            continue
        differences = {}
        for seed in seeds:
            a, b = result["runs"][mor][seed]["final_val_loss"], result["runs"][vanilla][seed]["final_val_loss"]
            if a is not None and b is not None:
                differences[seed] = a - b
        result["rows"][label] = {"mor": mor, "vanilla": vanilla, "differences": differences}
        cells = " | ".join(f"{differences[seed]:+.4f}" if seed in differences else "" for seed in seeds)
        used = calibration_tokens_used(layout.upcycled_run(runs()[mor], seeds[0]))
        result["rows"][label]["calibration_tokens_used"] = used
        table.append(f"| {label} | {mean_std(list(differences.values()))} | {cells} | {f'{used:,}' if used else ''} |")
    header = ("| variant | MoR - vanilla, final val loss (mean ± std) | " + " | ".join(f"seed {s}" for s in seeds)
              + " | MoR calibration tokens used |")
    rule = "|---|---|" + "---|" * (len(seeds) + 1)
    timings = json.loads(layout.timings.read_text()) if layout.timings.is_file() else {}
    trained = [seconds for stage, seconds in timings.items() if stage.startswith("train ")]
    dense_long = timings.get("dense (4x longer)")
    spent = (f"Training time of the study's {len(trained)} runs: {sum(trained) / 60:.0f} min"
             + (f", plus {dense_long / 60:.0f} min for the long dense model" if dense_long else "")
             + f" (2 ranks each, one thread per rank, on the 2-core machine). Matched router scale: {scale:.4g}.")
    (root / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    (root / "study.md").write_text("\n".join([REPORT_TITLE, "", header, rule, *table, "", spent, "",
                                              *health_tables(result, seeds)]) + "\n")
    print(f"study: wrote {root / 'study.md'}", flush=True)


def docs_block() -> "re.Pattern":
    """The backbone's block of the docs: `<!-- study:begin ... -->` for mha, `<!-- study:begin gqa ... -->` for gqa."""
    name = "" if BACKBONE == "mha" else f" {BACKBONE}"
    return re.compile(rf"(<!-- study:begin{name}(?: [^\n]*)?-->\n).*?(<!-- study:end{name} -->)", re.S)


def docs_with_markers(docs: Path) -> str:
    """The file's text; a one-line error when it has no study block to fill (checked before any training)."""
    text = docs.read_text() if docs.is_file() else ""
    if not docs_block().search(text):
        name = "" if BACKBONE == "mha" else f" {BACKBONE}"
        raise QuickstartError(f"{docs} has no '<!-- study:begin{name} ... -->' ... '<!-- study:end{name} -->' block to fill")
    return text


def fill_docs(docs: Path, report: str) -> None:
    """Put the report (without its title: the document has its own; other headings one level down) between the
    file's study markers, leaving the rest of the file as it was; written whole, then renamed."""
    lines = report.removeprefix(REPORT_TITLE).strip().splitlines()
    body = "\n".join("#" + line if line.startswith("## ") else line for line in lines)
    text = docs_block().sub(lambda match: match.group(1) + body + "\n" + match.group(2), docs_with_markers(docs), count=1)
    write_text_atomic(str(docs), text)
    print(f"study: filled {docs}", flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.quickstart.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=list(BACKBONES), default="mha", help="the dense model: mha (the "
                        "quickstart's), gqa (2 key/value heads) or qwen3 (QK-norm, 2 key/value heads); default mha")
    parser.add_argument("--output", help="study folder (default runs/study, runs/study-BACKBONE for the others)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (default 1 2 3)")
    parser.add_argument("--only", nargs="+", help="train only these runs of the backbone (vanilla and mor always)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: write study.md and study.json "
                        "from the runs that finished (every row; those not run say so)")
    parser.add_argument("--docs", type=Path, help="also write the report between this file's study markers "
                        "('<!-- study:begin ... -->' and '<!-- study:end -->'), e.g. docs/results.md")
    args = parser.parse_args(argv)
    global BACKBONE
    BACKBONE = args.backbone
    with user_errors():
        unknown = sorted(set(args.only or []) - set(runs()))
        if unknown:
            raise QuickstartError(f"--only {unknown[0]}: not a run of the {BACKBONE} study ({', '.join(runs())})")
        if args.docs:
            docs_with_markers(args.docs)  # before hours of training
        root = Path(args.output or ("runs/study" if BACKBONE == "mha" else f"runs/study-{BACKBONE}")).resolve()
        settings = DemoSettings(dense=BACKBONES[BACKBONE])
        prepare_output(root, settings, fresh=False)
        selected = list(dict.fromkeys(["vanilla", "mor", *(args.only or runs())]))
        study = Study(Layout(root), settings, args.seeds)
        if args.report_only:
            study.report()
        else:
            study.run_study(selected)
        if args.docs:
            fill_docs(args.docs, (root / "study.md").read_text())


if __name__ == "__main__":
    main()
