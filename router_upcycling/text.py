"""Text documents -> EOS-joined token chunks -> batches: the one pipeline behind calibration and the analyses.

Documents are read lazily from jsonl, jsonl.gz, txt, parquet files and dataset folders; each is
tokenized without special tokens and followed by an EOS token; the token stream is truncated to
`max_tokens` and cut into consecutive chunks of `seq_length` tokens (the last, shorter chunk kept),
and consecutive chunks of one length are grouped into batches. No padding: every token counts.

Imports only the standard library at load time (datasets and pyarrow when such input is read),
so both the init part and the analyses (which never import megatron-core) can use it.
"""
import gzip
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Union

from router_upcycling.errors import UserError

PathLike = Union[str, os.PathLike]
FILE_FORMATS = (".jsonl", ".jsonl.gz", ".txt", ".parquet")
TOKENIZE_BATCH_DOCUMENTS = 64


class TextDataError(UserError):
    """Text input that is missing, empty or unreadable, or a tokenizer that cannot end documents."""


def _file_format(path: Path) -> Optional[str]:
    name = path.name.lower()
    return next((suffix for suffix in FILE_FORMATS if name.endswith(suffix)), None)


def _read_jsonl(path: Path, json_key: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TextDataError(f"{path}:{line_number}: not a JSON object ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                raise TextDataError(f"{path}:{line_number}: no string field {json_key!r}")
            yield record[json_key]


def _read_text(path: Path) -> Iterator[str]:
    yield path.read_text(encoding="utf-8")


def _read_parquet(path: Path, json_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if json_key not in parquet.schema_arrow.names:
        raise TextDataError(f"{path}: no column {json_key!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(columns=[json_key]):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


def _read_file(path: Path, json_key: str) -> Iterator[str]:
    file_format = _file_format(path)
    if file_format == ".txt":
        return _read_text(path)
    if file_format == ".parquet":
        return _read_parquet(path, json_key)
    if file_format in (".jsonl", ".jsonl.gz"):
        return _read_jsonl(path, json_key)
    raise TextDataError(f"{path}: unknown file format; expected one of {', '.join(FILE_FORMATS)} or a dataset folder")


def _read_saved_dataset(path: Path, json_key: str) -> Iterator[str]:
    """A `datasets.save_to_disk` folder; a DatasetDict contributes every split in its stored order."""
    import datasets

    saved = datasets.load_from_disk(str(path))
    splits = list(saved.values()) if isinstance(saved, datasets.DatasetDict) else [saved]
    for split in splits:
        if json_key not in split.column_names:
            raise TextDataError(f"{path}: no column {json_key!r} (columns: {', '.join(split.column_names)})")
        yield from (row[json_key] for row in split.select_columns([json_key]))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_folder(path: Path, json_key: str) -> Iterator[str]:
    if _is_saved_dataset(path):
        yield from _read_saved_dataset(path, json_key)
        return
    files = sorted(file for file in path.rglob("*") if file.is_file() and _file_format(file))
    if not files:
        raise TextDataError(f"{path}: a folder with no dataset and no {', '.join(FILE_FORMATS)} files")
    for file in files:
        yield from _read_nonempty(file, json_key)


def _read_nonempty(path: Path, json_key: str) -> Iterator[str]:
    """The non-empty documents of one path; a path with none is an error."""
    reader = _read_folder(path, json_key) if path.is_dir() else _read_file(path, json_key)
    found = False
    try:
        for text in reader:
            if not isinstance(text, str):
                raise TextDataError(f"{path}: field {json_key!r} holds {type(text).__name__}, not text")
            if text:
                found = True
                yield text
    except TextDataError:
        raise
    except (OSError, EOFError, ValueError) as error:  # ValueError: bad UTF-8, corrupt parquet
        raise TextDataError(f"{path}: unreadable ({error})") from None
    if not found:
        raise TextDataError(f"{path}: no documents in it")


def read_documents(paths: Union[PathLike, Sequence[PathLike]], json_key: str = "text") -> Iterator[str]:
    """Documents, read lazily, in the order of the paths (missing paths are reported at once).

    Each path is a `.jsonl` or `.jsonl.gz` file (one JSON object per line, the text under json_key),
    a `.txt` file (the whole file is one document), a `.parquet` file (column json_key), or a folder:
    a `datasets.save_to_disk` folder, or any folder of those files (read recursively, sorted by path).
    Empty documents are skipped. A missing path, a path without documents, a malformed line or an
    unreadable file raises TextDataError naming the path (and the line).
    """
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(path) for path in paths]
    if not paths:
        raise TextDataError("no document files given")
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise TextDataError(f"{', '.join(missing)}: no such file or folder")
    return (text for path in paths for text in _read_nonempty(path, json_key))


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter); itertools.batched before Python 3.12."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _document_token_ids(documents: Iterable[str], tokenizer) -> Iterator[List[int]]:
    """Token ids of each document followed by EOS; tokenized in batches (fast tokenizers run them in parallel)."""
    for texts in batched(documents, TOKENIZE_BATCH_DOCUMENTS):
        for token_ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            yield token_ids + [tokenizer.eos_token_id]


def token_chunks(documents: Iterable[str], tokenizer, max_tokens: int, seq_length: int) -> Iterator[List[int]]:
    """Consecutive chunks of seq_length token ids (the last one may be shorter), max_tokens in all.

    Each document is tokenized without special tokens and followed by the EOS id; documents are read
    only as far as max_tokens needs. Raises ValueError for non-positive lengths and TextDataError
    for a tokenizer without an EOS token.
    """
    if max_tokens < 1 or seq_length < 1:
        raise ValueError(f"max_tokens and seq_length must be positive, got {max_tokens} and {seq_length}")
    if tokenizer.eos_token_id is None:
        raise TextDataError("the tokenizer has no EOS token, which is appended to every document")
    return _chunks(_document_token_ids(documents, tokenizer), max_tokens, seq_length)


def _chunks(token_streams: Iterable[List[int]], max_tokens: int, seq_length: int) -> Iterator[List[int]]:
    buffer: List[int] = []
    budget = max_tokens  # tokens still allowed into the stream
    for token_ids in token_streams:
        taken = token_ids[:budget]
        buffer.extend(taken)
        budget -= len(taken)
        while len(buffer) >= seq_length:
            yield buffer[:seq_length]
            del buffer[:seq_length]
        if budget == 0:
            break
    if buffer:
        yield buffer


def equal_length_batches(chunks: Iterable[List[int]], batch_size: int) -> Iterator[List[List[int]]]:
    """Up to batch_size consecutive chunks of one length per batch: a shorter chunk (the last) runs in its own
    batch, so a batch needs no padding (torch.tensor(batch) is [B, S])."""
    batch: List[List[int]] = []
    for chunk in chunks:
        if batch and (len(batch) == batch_size or len(chunk) != len(batch[0])):
            yield batch
            batch = []
        batch.append(chunk)
    if batch:
        yield batch
