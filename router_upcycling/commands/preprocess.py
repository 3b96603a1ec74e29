"""Tokenize documents into megatron-core indexed datasets for training (--data-path PREFIX_text_document).

    python tools/preprocess_data.py --input corpus.jsonl.gz --tokenizer-model /models/Qwen1.5-0.5B \\
        --output-prefix /data/corpus --workers 16

writes /data/corpus_text_document.bin and .idx, the files Megatron-LM's own tools/preprocess_data.py
writes (one sequence per document, EOS appended as end-of-document). Flag names follow Megatron-LM's.
"""
import argparse
import sys

from router_upcycling.cli import OneLineErrorParser, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="PATH",
        help="input files or folders, read in this order: .jsonl/.json (one JSON object per line, optionally "
        ".gz), .parquet, a folder written by datasets' save_to_disk, or a folder of such files (sorted by path)",
    )
    parser.add_argument(
        "--json-keys", "--json-key", nargs="+", default=["text"], metavar="KEY",
        help="field(s) holding the document text; one output dataset per key (default: text)",
    )
    parser.add_argument(
        "--tokenizer-model", "--tokenizer", required=True, metavar="HF_DIR", dest="tokenizer",
        help="Hugging Face tokenizer folder (loaded with AutoTokenizer); its EOS token ends each document",
    )
    parser.add_argument(
        "--tokenizer-type", default="HuggingFaceTokenizer", choices=["HuggingFaceTokenizer"],
        help="accepted for Megatron-LM compatibility; only Hugging Face tokenizers are supported",
    )
    parser.add_argument(
        "--output-prefix", required=True, metavar="PREFIX",
        help="writes PREFIX_{key}_document.bin and .idx; the folder must exist",
    )
    parser.add_argument(
        "--workers", type=int, default=1,
        help="tokenizer processes (default 1); the output does not depend on it",
    )
    parser.add_argument(
        "--append-eod", action=argparse.BooleanOptionalAction, default=True,
        help="append the EOS token to every document (default: on; --no-append-eod to skip)",
    )
    parser.add_argument(
        "--log-interval", type=int, default=1000, metavar="N",
        help="update the document count on the progress bar every N documents (default 1000)",
    )
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


def run(args) -> None:
    from router_upcycling.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig(
        inputs=args.input,
        tokenizer=args.tokenizer,
        output_prefix=args.output_prefix,
        json_keys=args.json_keys,
        workers=args.workers,
        append_eod=args.append_eod,
        force=args.force,
        log_interval=args.log_interval,
        show_progress=not args.no_progress,
    )
    for summary in preprocess(config):
        rate = summary.tokens / max(summary.seconds, 1e-9)
        print(
            f"wrote {summary.prefix}.bin/.idx: {summary.documents} documents, {summary.tokens} tokens "
            f"({summary.skipped_empty} empty skipped) in {summary.seconds:.1f}s, {rate:,.0f} tokens/s"
        )


if __name__ == "__main__":
    sys.exit(main())
