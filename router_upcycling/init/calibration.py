"""Calibration: the average attention key of every layer of a frozen dense Qwen2 model (method.md part 2).

Documents are tokenized without special tokens, an EOS token is appended to each, they are
concatenated and cut into consecutive chunks of `seq_length` tokens (the last partial chunk kept),
up to `max_tokens` tokens. The average key of layer l is the mean over every calibration token t of
k_proj(x_t) (with bias), x_t being the k_proj input (after input_layernorm), before RoPE.

Shape legend
    L  layers        H_kv  key/value heads      d_h  head dim
    B  batch         S     chunk length         d    hidden size
"""
import gzip
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from router_upcycling.errors import UserError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
FILE_FORMATS = (".jsonl", ".jsonl.gz", ".txt", ".parquet")
TOKENIZE_BATCH_DOCUMENTS = 64
CUDA_TOKENS_PER_BATCH = 65536


class CalibrationDataError(UserError):
    """Calibration input that is missing, empty or unreadable."""


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
                raise CalibrationDataError(f"{path}:{line_number}: not a JSON object ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                raise CalibrationDataError(f"{path}:{line_number}: no string field {json_key!r}")
            yield record[json_key]


def _read_text(path: Path) -> Iterator[str]:
    yield path.read_text(encoding="utf-8")


def _read_parquet(path: Path, json_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if json_key not in parquet.schema_arrow.names:
        raise CalibrationDataError(f"{path}: no column {json_key!r} (columns: {', '.join(parquet.schema_arrow.names)})")
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
    raise CalibrationDataError(f"{path}: unknown calibration file format; expected one of {', '.join(FILE_FORMATS)} or a dataset folder")


def _read_saved_dataset(path: Path, json_key: str) -> Iterator[str]:
    """A `datasets.save_to_disk` folder; a DatasetDict contributes every split in its stored order."""
    import datasets

    saved = datasets.load_from_disk(str(path))
    splits = list(saved.values()) if isinstance(saved, datasets.DatasetDict) else [saved]
    for split in splits:
        if json_key not in split.column_names:
            raise CalibrationDataError(f"{path}: no column {json_key!r} (columns: {', '.join(split.column_names)})")
        yield from (row[json_key] for row in split.select_columns([json_key]))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_folder(path: Path, json_key: str) -> Iterator[str]:
    if _is_saved_dataset(path):
        yield from _read_saved_dataset(path, json_key)
        return
    files = sorted(file for file in path.rglob("*") if file.is_file() and _file_format(file))
    if not files:
        raise CalibrationDataError(f"{path}: a folder with no dataset and no {', '.join(FILE_FORMATS)} files")
    for file in files:
        yield from _read_nonempty(file, json_key)


def _read_nonempty(path: Path, json_key: str) -> Iterator[str]:
    """The non-empty documents of one path; a path with none is an error."""
    reader = _read_folder(path, json_key) if path.is_dir() else _read_file(path, json_key)
    found = False
    try:
        for text in reader:
            if not isinstance(text, str):
                raise CalibrationDataError(f"{path}: field {json_key!r} holds {type(text).__name__}, not text")
            if text:
                found = True
                yield text
    except CalibrationDataError:
        raise
    except (OSError, EOFError, ValueError) as error:  # ValueError: bad UTF-8, corrupt parquet
        raise CalibrationDataError(f"{path}: unreadable ({error})") from None
    if not found:
        raise CalibrationDataError(f"{path}: no calibration documents in it")


def read_documents(paths: Union[PathLike, Sequence[PathLike]], json_key: str = "text") -> Iterator[str]:
    """Calibration documents, read lazily, in the order of the paths (missing paths are reported at once).

    Each path is a `.jsonl` or `.jsonl.gz` file (one JSON object per line, the text under json_key),
    a `.txt` file (the whole file is one document), a `.parquet` file (column json_key), or a folder:
    a `datasets.save_to_disk` folder, or any folder of those files (read recursively, sorted by path).
    Empty documents are skipped. A missing path, a path without documents, a malformed line or an
    unreadable file raises CalibrationDataError naming the path (and the line).
    """
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(path) for path in paths]
    if not paths:
        raise CalibrationDataError("no calibration files given")
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise CalibrationDataError(f"{', '.join(missing)}: no such calibration file or folder")
    return (text for path in paths for text in _read_nonempty(path, json_key))


def _batched(items: Iterable, size: int) -> Iterator[list]:
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
    for texts in _batched(documents, TOKENIZE_BATCH_DOCUMENTS):
        for token_ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            yield token_ids + [tokenizer.eos_token_id]


def calibration_chunks(documents: Iterable[str], tokenizer, max_tokens: int, seq_length: int) -> Iterator[List[int]]:
    """Token chunks for calibration.

    Each document is tokenized without special tokens and followed by the EOS id; the stream is
    truncated to max_tokens tokens and cut into consecutive chunks of seq_length (the last one may be
    shorter).
    """
    if max_tokens < 1 or seq_length < 1:
        raise ValueError(f"max_tokens and seq_length must be positive, got {max_tokens} and {seq_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which calibration appends to every document")
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


def _equal_length_batches(chunks: Iterable[List[int]], batch_size: int) -> Iterator[List[List[int]]]:
    """Batches of chunks of one length: a shorter chunk (the last) runs in its own batch, so no padding."""
    batch: List[List[int]] = []
    for chunk in chunks:
        if batch and (len(batch) == batch_size or len(chunk) != len(batch[0])):
            yield batch
            batch = []
        batch.append(chunk)
    if batch:
        yield batch


def default_batch_size(seq_length: int, device: torch.device) -> int:
    """1 chunk per batch on CPU (larger batches do not run faster there); about 64k tokens per batch on CUDA."""
    return max(1, CUDA_TOKENS_PER_BATCH // seq_length) if device.type == "cuda" else 1


def _default_device(model: torch.nn.Module) -> torch.device:
    model_device = next(model.parameters()).device
    if model_device.type != "cpu":
        return model_device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The Qwen2Model inside a Qwen2ForCausalLM (running it skips the LM head), or the model itself."""
    return getattr(model, "model", model)


class _KeyInputSums:
    """Forward pre-hooks on every layer's self_attn.k_proj that sum its input x over tokens, in float64."""

    def __init__(self, layers: Sequence[torch.nn.Module], device: torch.device):
        hidden_size = layers[0].self_attn.k_proj.in_features
        self.sums = torch.zeros(len(layers), hidden_size, dtype=torch.float64, device=device)  # [L, d]
        self.handles = [
            layer.self_attn.k_proj.register_forward_pre_hook(self._hook(index)) for index, layer in enumerate(layers)
        ]

    def _hook(self, index: int):
        def add_input(module, inputs):
            self.sums[index] += inputs[0].reshape(-1, inputs[0].shape[-1]).double().sum(dim=0)

        return add_input

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _keys_of_mean_input(layers: Sequence[torch.nn.Module], mean_inputs: torch.Tensor) -> torch.Tensor:
    """k_proj is affine, so mean_t k_proj(x_t) = k_proj(mean_t x_t): [L, d] -> [L, H_kv * d_h], float64."""
    keys = []
    for layer, mean_input in zip(layers, mean_inputs):
        k_proj = layer.self_attn.k_proj
        bias = k_proj.bias.double() if k_proj.bias is not None else 0.0
        keys.append(k_proj.weight.double() @ mean_input.to(k_proj.weight.device) + bias)
    return torch.stack(keys)


def average_attention_keys(
    model: torch.nn.Module,
    tokenizer,
    documents: Iterable[str],
    max_tokens: int,
    seq_length: int,
    batch_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Average pre-RoPE key of every layer and key/value head over the calibration tokens.

    Args:
        model: a dense Hugging Face Qwen2ForCausalLM (or Qwen2Model); it is run frozen (eval, no grad) and is
            left in its original mode and on its original device.
        tokenizer: the model's tokenizer.
        documents: texts, e.g. read_documents(paths).
        max_tokens: calibration tokens in total (fewer if the documents run out; a warning says so).
        seq_length: chunk length.
        batch_size: chunks per forward; default: default_batch_size(seq_length, device). The result does
            not depend on it.
        device: where to run; default: the model's device if it is an accelerator, else CUDA when
            available, else CPU.
        progress: show a tqdm bar counting tokens.

    Returns:
        [L, H_kv, d_h] float32, on CPU.
    """
    device = torch.device(device) if device is not None else _default_device(model)
    chunks = calibration_chunks(documents, tokenizer, max_tokens, seq_length)
    decoder = _decoder(model)
    original_device, was_training = next(model.parameters()).device, model.training
    model.eval().to(device)
    try:
        input_sums, num_tokens = _sum_key_inputs(
            decoder, chunks, batch_size or default_batch_size(seq_length, device), device, progress, max_tokens
        )
    finally:
        model.train(was_training).to(original_device)
    if num_tokens == 0:
        raise CalibrationDataError("the calibration documents hold no tokens")
    if num_tokens < max_tokens:
        logger.warning("calibration used %d tokens: the documents ran out before the %d asked for", num_tokens, max_tokens)
    keys = _keys_of_mean_input(decoder.layers, input_sums.cpu() / num_tokens)  # [L, H_kv * d_h]
    num_kv_heads = model.config.num_key_value_heads
    return keys.reshape(len(decoder.layers), num_kv_heads, keys.shape[1] // num_kv_heads).float().cpu()


def _sum_key_inputs(
    decoder: torch.nn.Module, chunks: Iterable[List[int]], batch_size: int, device: torch.device, progress: bool, max_tokens: int
) -> Tuple[torch.Tensor, int]:
    """Run the decoder over the chunks; returns (sum over tokens of every layer's k_proj input [L, d] float64, tokens)."""
    sums = _KeyInputSums(decoder.layers, device)
    num_tokens = 0
    try:
        with torch.no_grad(), tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="calibration", disable=not progress) as bar:
            for batch in _equal_length_batches(chunks, batch_size):
                input_ids = torch.tensor(batch, dtype=torch.long, device=device)  # [B, S]
                decoder(input_ids=input_ids, use_cache=False)
                num_tokens += input_ids.numel()
                bar.update(input_ids.numel())
    finally:
        sums.remove()
    return sums.sums, num_tokens
