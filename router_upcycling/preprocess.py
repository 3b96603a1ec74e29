"""Tokenize text documents into megatron-core indexed datasets (PREFIX_{key}_document.bin/.idx).

The files are the ones Megatron-LM's tools/preprocess_data.py writes: one sequence per document
(its tokens, then the tokenizer's EOS token as end-of-document), token dtype uint16 when the
vocabulary has fewer than 65500 entries and int32 otherwise. Documents whose text tokenizes to
nothing are skipped, as Megatron-LM skips them.

Inputs, read in the order given: JSON lines (.jsonl, .json, optionally .gz), Parquet (.parquet),
a folder written by `datasets.Dataset.save_to_disk`, or any other folder (its .jsonl[.gz]/.json[.gz]/
.parquet files, sorted by path). Tokenization runs in worker processes; output order, and so the
files, do not depend on the number of workers.
"""
import collections
import concurrent.futures
import gzip
import json
import multiprocessing
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence

import numpy
from tqdm import tqdm

from router_upcycling.errors import UserError
from router_upcycling.outputs import refuse_existing, staging_folder
from router_upcycling.text import batched

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
DOCUMENTS_PER_TASK = 64
BATCHES_IN_FLIGHT_PER_WORKER = 4


class PreprocessError(UserError):
    """Bad input or arguments; the message is shown to the user as is."""


@dataclass
class PreprocessConfig:
    inputs: Sequence[str]
    tokenizer: str
    output_prefix: str
    json_keys: Sequence[str] = ("text",)
    workers: int = 1
    append_eod: bool = True
    force: bool = False
    log_interval: int = 1000
    show_progress: bool = True


@dataclass
class OutputSummary:
    prefix: str
    documents: int = 0
    tokens: int = 0
    skipped_empty: int = 0
    seconds: float = 0.0


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


# --- reading ------------------------------------------------------------------------------------


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return any(path.name.endswith(suffix) for suffix in suffixes)


def expand_inputs(inputs: Sequence[str]) -> List[Path]:
    """Files and dataset folders, in the given order; plain folders expand to their data files, sorted."""
    expanded = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise PreprocessError(f"input not found: {raw}")
        if path.is_dir() and not _is_saved_dataset(path):
            files = sorted(p for p in path.rglob("*") if p.is_file() and _has_suffix(p, JSON_SUFFIXES + PARQUET_SUFFIXES))
            if not files:
                raise PreprocessError(f"{raw}: folder holds no .jsonl, .json, .parquet file nor a saved dataset")
            expanded.extend(files)
        elif path.is_dir() or _has_suffix(path, JSON_SUFFIXES + PARQUET_SUFFIXES):
            expanded.append(path)
        else:
            raise PreprocessError(f"{raw}: unsupported input (expected .jsonl, .jsonl.gz, .json, .parquet or a folder)")
    return expanded


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").exists() or (path / "dataset_dict.json").exists()


def _texts_from_record(record, keys: Sequence[str], where: str) -> List[str]:
    if not isinstance(record, dict):
        raise PreprocessError(f"{where}: expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            raise PreprocessError(f"{where}: no key {key!r} (keys: {', '.join(sorted(record)) or 'none'})")
        if not isinstance(record[key], str):
            raise PreprocessError(f"{where}: {key!r} is {type(record[key]).__name__}, expected a string")
        texts.append(record[key])
    return texts


def _read_json_lines(path: Path, keys: Sequence[str]) -> Iterator[List[str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                where = f"{path}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PreprocessError(f"{where}: malformed JSON at column {e.colno}: {e.msg}") from None
                yield _texts_from_record(record, keys, where)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise PreprocessError(f"{path}: cannot read ({e})") from None


def _read_arrow_batches(batches, keys: Sequence[str], source: str) -> Iterator[List[str]]:
    row = 0
    for batch in batches:
        columns = [batch.column(key).to_pylist() for key in keys]
        for texts in zip(*columns):
            row += 1
            for key, text in zip(keys, texts):
                if not isinstance(text, str):
                    raise PreprocessError(f"{source}: row {row}: {key!r} is {type(text).__name__}, expected a string")
            yield list(texts)


def _check_columns(columns: Sequence[str], keys: Sequence[str], source: str) -> None:
    missing = [key for key in keys if key not in columns]
    if missing:
        raise PreprocessError(f"{source}: no column {missing[0]!r} (columns: {', '.join(columns)})")


def _read_parquet(path: Path, keys: Sequence[str]) -> Iterator[List[str]]:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet_file = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as e:
        raise PreprocessError(f"{path}: not a readable Parquet file ({e})") from None
    _check_columns(parquet_file.schema_arrow.names, keys, str(path))
    yield from _read_arrow_batches(parquet_file.iter_batches(columns=list(keys)), keys, str(path))


def _read_saved_dataset(path: Path, keys: Sequence[str]) -> Iterator[List[str]]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise PreprocessError(f"{path}: holds the splits {', '.join(dataset)}; pass one split folder, e.g. {path / next(iter(dataset))}")
    _check_columns(dataset.column_names, keys, str(path))
    yield from _read_arrow_batches(dataset.data.to_batches(), keys, str(path))


def read_documents(path: Path, keys: Sequence[str]) -> Iterator[List[str]]:
    """Yields, per document, its texts under keys (in keys' order). Raises PreprocessError with the location."""
    if path.is_dir():
        return _read_saved_dataset(path, keys)
    if _has_suffix(path, PARQUET_SUFFIXES):
        return _read_parquet(path, keys)
    return _read_json_lines(path, keys)


# --- tokenizing (runs in workers) ---------------------------------------------------------------


class _Encoder:
    tokenizer = None
    append_eod = True

    @classmethod
    def initialize(cls, tokenizer_path: str, append_eod: bool, in_worker: bool = False) -> None:
        if in_worker:  # Ctrl-C reaches the whole process group: the main process stops the workers (cli)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the command's stop handler
        cls.tokenizer = load_tokenizer(tokenizer_path)
        cls.append_eod = append_eod

    @classmethod
    def encode(cls, batch: List[List[str]]) -> List[List[List[int]]]:
        """[document][key] texts -> [document][key] token ids, EOD appended to non-empty ones."""
        by_key = [cls.tokenizer([texts[k] for texts in batch])["input_ids"] for k in range(len(batch[0]))]
        eod = [cls.tokenizer.eos_token_id] if cls.append_eod else []
        return [[ids + eod if ids else [] for ids in document] for document in zip(*by_key)]


def load_tokenizer(path: str):
    """A Hugging Face tokenizer folder; its EOS token is the end-of-document token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PreprocessError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise PreprocessError(f"tokenizer {path} has no EOS token to mark the end of documents")
    return tokenizer


# --- writing ------------------------------------------------------------------------------------


def _indexed_dataset_module():
    # megatron.core's package import warns about optional CUDA extensions: noise for a data tool.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _existing_outputs(prefixes: Sequence[str]) -> List[str]:
    return [path for prefix in prefixes for path in (f"{prefix}.bin", f"{prefix}.idx") if os.path.exists(path)]


def _encoded_batches(config: PreprocessConfig, files: Sequence[Path], pool) -> Iterator[List[List[List[int]]]]:
    """Encoded batches in input order. Reading stays in this process, a bounded number of batches ahead
    of the writer (a pool's map would read the whole input into memory), so a read error surfaces here."""
    batches = (batch for path in files for batch in batched(read_documents(path, config.json_keys), DOCUMENTS_PER_TASK))
    if pool is None:
        yield from map(_Encoder.encode, batches)
        return
    pending = collections.deque()
    for batch in batches:
        pending.append(pool.submit(_Encoder.encode, batch))
        if len(pending) >= BATCHES_IN_FLIGHT_PER_WORKER * config.workers:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def preprocess(config: PreprocessConfig) -> List[OutputSummary]:
    """Tokenize config.inputs into one indexed dataset per JSON key; returns what was written."""
    if config.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {config.workers}")
    if not config.json_keys:
        raise PreprocessError("no JSON key given")
    if config.log_interval < 1:
        raise PreprocessError(f"--log-interval must be at least 1, got {config.log_interval}")
    files = expand_inputs(config.inputs)
    if config.output_prefix.endswith((os.sep, "/")) or not Path(config.output_prefix).name:
        example = os.path.join(config.output_prefix, "corpus")
        raise PreprocessError(f"--output-prefix {config.output_prefix} names a folder, not a file-name prefix: give e.g. "
                              f"{example} (writes {output_prefix_for(example, config.json_keys[0])}.bin/.idx)")
    prefixes = [output_prefix_for(config.output_prefix, key) for key in config.json_keys]
    for path in _existing_outputs(prefixes):
        refuse_existing(path, config.force)
    output_dir = Path(config.output_prefix).parent
    if output_dir.exists() and not output_dir.is_dir():
        raise PreprocessError(f"--output-prefix {config.output_prefix}: {output_dir} is a file, not a folder")
    if not output_dir.is_dir():
        raise PreprocessError(f"--output-prefix {config.output_prefix}: output folder {output_dir} does not exist")

    tokenizer = load_tokenizer(config.tokenizer)
    indexed_dataset = _indexed_dataset_module()
    dtype = indexed_dataset.DType.optimal_dtype(len(tokenizer))
    with staging_folder(str(output_dir), ".preprocess-") as staging:
        staged = [str(Path(staging) / Path(prefix).name) for prefix in prefixes]
        summaries = _write_datasets(config, files, staged, dtype, indexed_dataset)
        for key, summary in zip(config.json_keys, summaries):
            if summary.documents == 0:
                raise PreprocessError(f"--input holds no document with text under --json-keys {key} ("
                                      f"{summary.skipped_empty} empty): refusing to write an empty dataset")
        for staged_prefix, prefix, summary in zip(staged, prefixes, summaries):
            for suffix in (".bin", ".idx"):
                os.replace(staged_prefix + suffix, prefix + suffix)
            summary.prefix = prefix
        return summaries


def _write_datasets(config: PreprocessConfig, files, staged_prefixes, dtype, indexed_dataset) -> List[OutputSummary]:
    builders = [indexed_dataset.IndexedDatasetBuilder(f"{p}.bin", dtype=dtype) for p in staged_prefixes]
    summaries = [OutputSummary(p) for p in staged_prefixes]
    started = time.monotonic()
    progress = tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=not config.show_progress, mininterval=1.0)
    pool = None
    if config.workers > 1:
        # not multiprocessing.Pool: it forks a replacement for a worker that dies, and a stop signal's clean-up
        # (router_upcycling.cli) terminates the workers; a replacement could hang on the lock a stopped worker held
        # and outlive the command. This pool forks none: a lost worker breaks it.
        pool = concurrent.futures.ProcessPoolExecutor(
            config.workers, mp_context=multiprocessing.get_context(), initializer=_Encoder.initialize,
            initargs=(config.tokenizer, config.append_eod, True),
        )
    else:
        _Encoder.initialize(config.tokenizer, config.append_eod)
    try:
        documents_seen = 0
        for batch in _encoded_batches(config, files, pool):
            for document in batch:
                for builder, summary, ids in zip(builders, summaries, document):
                    if not ids:
                        summary.skipped_empty += 1
                        continue
                    builder.add_document(numpy.asarray(ids), [len(ids)])
                    summary.documents += 1
                    summary.tokens += len(ids)
                    progress.update(len(ids))
                documents_seen += 1
                if documents_seen % config.log_interval == 0:
                    progress.set_postfix(documents=documents_seen, refresh=False)
    except BaseException:
        for builder in builders:
            builder.data_file.close()
        raise
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    for builder, prefix in zip(builders, staged_prefixes):
        builder.finalize(f"{prefix}.idx")
    for summary in summaries:
        summary.seconds = time.monotonic() - started
    return summaries
