"""`python -m router_upcycling.analyze {routing,specialization,load,health}`: routing and expert analyses of an MoE folder."""
import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from router_upcycling.analyze.errors import AnalysisError
from router_upcycling.cli import OneLineErrorParser, run_command
from router_upcycling.files import read_json_object
from router_upcycling.outputs import refuse_existing, staged_output
from router_upcycling.text import read_documents, token_chunks

TEXT_INPUT = ("a .jsonl, .jsonl.gz, .txt (one document) or .parquet file, a datasets.save_to_disk folder, "
              "or a folder of such files")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face MoE folder (stock Qwen2-MoE or a `mor` export)")
    parser.add_argument("--output", required=True, help="folder to create for the JSON and PNG (refuses an existing one without --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--json-key", default="text", help="text field of .jsonl rows, or text column of .parquet files and dataset folders (default: text)")
    parser.add_argument("--max-tokens", type=int, default=65536, help="tokens to analyse per domain or --data (default 65536)")
    parser.add_argument("--seq-length", type=int, default=2048, help="tokens per sequence: documents are EOS-joined and cut into chunks (default 2048)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32 (default), bfloat16 or float16")
    parser.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=True,
                        help="let the folder's own modeling code run (needed for `mor` exports; default on)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m router_upcycling.analyze",
                                     description="Routing diversity, expert specialisation, expert load and routing health of a Hugging Face MoE folder.")
    commands = parser.add_subparsers(dest="command", required=True)
    routing = commands.add_parser("routing", help="average routing weight of each expert per domain at one layer (paper Fig. 5)",
                                  description="Average routing weight of each expert per domain at one layer: top-k weights, zero for "
                                  "experts not chosen, averaged over every token of the domain's texts. Writes routing.json and routing.png.")
    routing.add_argument("--domain", action="append", required=True, metavar="NAME=FILE",
                         help=f"a domain and its texts: {TEXT_INPUT}; repeat for each domain (e.g. --domain Math=math.jsonl --domain Code=code.jsonl)")
    routing.add_argument("--layer", type=int, help="decoder layer index, negative counts from the end (default: the last MoE layer)")
    commands.add_parser("specialization", help="mean pairwise cosine similarity of expert outputs per layer (paper Fig. 6)",
                        description="Per layer, every expert is applied to every token of the layer's MoE input and the cosine "
                        "similarity of every pair of experts' outputs is averaged over pairs and tokens (lower = more specialised). "
                        "Writes specialization.json and specialization.png.")
    commands.add_parser("load", help="share of routed tokens per expert per layer",
                        description="Per layer, the share of routing slots (tokens x top-k) each expert received. Writes load.json and load.png.")
    commands.add_parser("health", help="routing health per layer: the numbers training logs as routing_health",
                        description="Per MoE layer, over every token of --data: max_share (largest share of routing slots an "
                        "expert received; 1/N = balanced), dead_experts (experts under 10%% of a fair share), top1_weight "
                        "(mean weight of the first of the k chosen experts; 1/k = even, 1 = one expert decides), logit_std "
                        "(standard deviation of the router logits) and entropy (of the mean softmax over all experts, nats; "
                        "ln N = balanced). Definitions: router_upcycling/routing_stats.py. Writes health.json and health.png.")
    for name in ("specialization", "load", "health"):
        commands.choices[name].add_argument("--data", required=True, help=f"the texts: {TEXT_INPUT}")
    for sub in commands.choices.values():
        add_common_arguments(sub)
    return parser


def parse_domains(specs: List[str]) -> Dict[str, str]:
    domains: Dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise AnalysisError(f"--domain expects NAME=FILE, got {spec!r}")
        if name in domains:
            raise AnalysisError(f"domain {name!r} given twice")
        domains[name] = path
    return domains


def check_output(path: Path, force: bool) -> None:
    refuse_existing(str(path), force)
    parent = path.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise AnalysisError(f"--output {path}: its parent {parent} is a file")
    if not parent.is_dir():
        raise AnalysisError(f"folder of --output does not exist: {path.parent}")


def write_output(output: Path, stem: str, result: dict, plot: Callable[[dict, str], None], force: bool) -> None:
    """Write STEM.json and STEM.png into a staging folder beside output that replaces it once both are written."""
    with staged_output(str(output), force) as staging:
        (Path(staging) / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(result, str(Path(staging) / f"{stem}.png"))


def run(args: argparse.Namespace) -> None:
    output = Path(args.output)
    check_output(output, args.force)
    if not Path(args.model, "config.json").is_file():
        raise AnalysisError(f"not a Hugging Face model folder (no config.json): {args.model}")
    read_json_object(str(Path(args.model, "config.json")), AnalysisError)
    if args.command == "routing":
        domain_files = parse_domains(args.domain)
        documents = {name: read_documents(path, args.json_key) for name, path in domain_files.items()}
    else:
        documents = {"data": read_documents(args.data, args.json_key)}
    from router_upcycling.analyze import analyses, plots
    from router_upcycling.analyze.inputs import load_model
    from router_upcycling.hf.loading import usable_device

    device = usable_device(args.device)
    model, tokenizer = load_model(args.model, device, args.dtype, args.trust_remote_code)
    if args.command == "routing":
        layer = analyses.pick_layer(model, args.layer)
    chunks = {name: list(token_chunks(docs, tokenizer, args.max_tokens, args.seq_length)) for name, docs in documents.items()}
    settings = {key: getattr(args, key) for key in ("max_tokens", "seq_length", "batch_size", "dtype")}
    if args.command == "routing":
        result = analyses.routing_weights_by_domain(model, chunks, layer, args.batch_size)
        result["files"] = domain_files
        plot = plots.plot_routing
    elif args.command == "specialization":
        result = analyses.expert_similarity_by_layer(model, chunks["data"], args.batch_size)
        plot = plots.plot_specialization
    elif args.command == "load":
        result = analyses.expert_load_by_layer(model, chunks["data"], args.batch_size)
        plot = plots.plot_load
    else:
        result = analyses.routing_health_by_layer(model, chunks["data"], args.batch_size)
        plot = plots.plot_health
    write_output(output, args.command, {"model": args.model, **result, "settings": settings}, plot, args.force)
    print(f"wrote {output / (args.command + '.json')} and {output / (args.command + '.png')}")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: check_and_run(args))


def check_and_run(args: argparse.Namespace) -> None:
    for name in ("max_tokens", "seq_length", "batch_size"):
        if getattr(args, name) < 1:
            raise AnalysisError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.dtype not in DTYPES:
        raise AnalysisError(f"unknown --dtype {args.dtype!r}; use {', '.join(DTYPES)}")
    run(args)


DTYPES = ("float32", "bfloat16", "float16")


if __name__ == "__main__":
    sys.exit(main())
