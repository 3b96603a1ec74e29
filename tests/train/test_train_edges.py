"""Training's edge checks: YAML value types, number limits, --split and --save, and data that does not fit the model
(token ids past the vocabulary, a split with no documents), each one line naming the flag or key."""
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy
import pytest

from router_upcycling.testing import write_token_documents
from router_upcycling.train import indexed
from router_upcycling.train.config import TrainError, parse_args

REQUIRED = ["--pretrained-checkpoint", "CKPT", "--data-path", "DATA"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_yaml(tmp_path, text: str, *flags):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return parse_args(["--config", str(path), *REQUIRED, *flags], on_this_machine=False)


@pytest.mark.parametrize("text,message", [
    ("seq-length: [64]\n", "seq-length must be an integer, got [64]"),
    ("seq-length: 1.5\n", "seq-length must be an integer, got 1.5"),
    ("seq-length: null\n", "seq-length needs a value"),
    ("lr: true\n", "lr must be a number, got True"),
    ("lr: fast\n", "lr must be a number, got 'fast'"),
    ("bf16: 'yes'\n", "bf16 must be true or false, got 'yes'"),
    ("lr-decay-style: exponential\n", "lr-decay-style must be one of constant, cosine, linear, step"),
    ("lr-step-decay-fractions: [0.8, x]\n", "lr-step-decay-fractions must be a number, got 'x'"),
])
def test_yaml_values_of_the_wrong_type_name_the_key(tmp_path, text, message):
    with pytest.raises(TrainError, match=re.escape(f"config {tmp_path / 'run.yaml'}: {message}")):
        parse_yaml(tmp_path, "train-iters: 5\n" + text)


def test_yaml_values_read_as_the_flags_read_them(tmp_path):
    config = parse_yaml(tmp_path, "train-iters: 5\nlr: 3e-4\nsplit: 100\nlr-step-decay-fractions: 0.5\n")
    assert config.lr == 3e-4 and config.split == "100" and config.lr_step_decay_fractions == [0.5]


@pytest.mark.parametrize("flags,message", [
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--lr=-1e-4"], "--lr must be positive, got -0.0001"),
    (["--eval-iters=-1"], "--eval-iters must be at least 0, got -1"),
    (["--save-interval", "0"], "--save-interval must be at least 1, got 0"),
    (["--adam-beta2", "1"], "--adam-beta2 must be below 1, got 1.0"),
    (["--adam-eps", "0"], "--adam-eps must be above 0"),
    (["--clip-grad=-1"], "--clip-grad must be at least 0"),
    (["--split", "98,x,0"], "--split must be up to three comma-separated proportions"),
    (["--split", "0,100,0"], "with a positive training share"),
    (["--split", "90,5,3,2"], "--split must be up to three"),
])
def test_numbers_out_of_range_are_refused_naming_the_flag(flags, message):
    with pytest.raises(TrainError, match=re.escape(message)):
        parse_args([*REQUIRED, "--train-iters", "5", *flags], on_this_machine=False)


def test_train_iters_must_be_at_least_one():
    with pytest.raises(TrainError, match="--train-iters is required and must be at least 1"):
        parse_args([*REQUIRED, "--train-iters", "0"], on_this_machine=False)


def test_save_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainError, match=re.escape(f"--save {tmp_path / 'file' / 'run'}: its parent {tmp_path / 'file'} is a file")):
        parse_args([*REQUIRED, "--train-iters", "5", "--save", str(tmp_path / "file" / "run")], on_this_machine=False)


def test_the_command_line_reports_one_line():
    result = subprocess.run([sys.executable, "-m", "router_upcycling.train", *REQUIRED, "--train-iters", "5", "--lr", "0"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --lr must be positive, got 0.0"]


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("data") / "tokens")
    write_token_documents(prefix, num_docs=20)  # token ids 0..200
    return prefix


def test_token_ids_past_the_vocabulary_are_refused(data_prefix):
    assert indexed.read_index_header(data_prefix).sequence_count == 20
    indexed.check_token_ids([data_prefix], vocab_size=256)
    with pytest.raises(TrainError, match=re.escape(f"--data-path {data_prefix} holds token id 200, but the model's "
                                                   "vocabulary has 128 tokens: the data was tokenized for another model")):
        indexed.check_token_ids([data_prefix], vocab_size=128)
    with pytest.raises(TrainError, match="holds token id 200"):
        indexed.check_token_ids(["1.0", data_prefix], vocab_size=128)  # a weighted blend


def test_a_large_file_is_scanned_in_spread_blocks(tmp_path, monkeypatch):
    prefix = str(tmp_path / "big")
    tokens = numpy.zeros(10_000, dtype=numpy.int32)
    tokens[::97] = 5000  # out-of-range ids spread over the file, as another tokenizer leaves them
    tokens.tofile(prefix + ".bin")
    monkeypatch.setattr(indexed, "WHOLE_SCAN_TOKENS", 1000)
    monkeypatch.setattr(indexed, "SCAN_BLOCKS", 8)
    monkeypatch.setattr(indexed, "SCAN_BLOCK_TOKENS", 200)
    assert indexed.largest_token_id(prefix, numpy.int32) == 5000


def test_a_damaged_index_is_one_line(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"not an index")
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(TrainError, match="bad.idx is not a megatron-core index"):
        indexed.check_token_ids([str(tmp_path / "bad")], vocab_size=128)


def test_a_split_without_documents_is_refused_before_the_dataset_builder(data_prefix, tmp_path):
    from router_upcycling.train.data import build_datasets

    config = parse_args(["--pretrained-checkpoint", "CKPT", "--data-path", data_prefix, "--train-iters", "2",
                         "--split", "99,1,0", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
                         "--eval-iters", "1", "--data-cache-path", str(tmp_path)], on_this_machine=False)
    tokenizer = SimpleNamespace(vocab_size=256, eod=0, unique_identifiers={"class": "test"})
    with pytest.raises(TrainError, match=re.escape(f"--split 99,1,0 gives the validation split none of the 20 "
                                                   f"documents of {data_prefix}")):
        build_datasets(config, tokenizer, 1)
    train, valid = build_datasets(config.replace(split="90,10,0"), tokenizer, 1)
    assert len(train) > 0 and len(valid) > 0
    with pytest.raises(TrainError, match="gives the test split none of the 20 documents"):
        build_datasets(config.replace(split="969,30,1"), tokenizer, 1)  # built even though no test samples are asked
    with pytest.raises(TrainError, match="gives the validation split none"):
        build_datasets(config.replace(eval_iters=0), tokenizer, 1)


def test_a_sequence_longer_than_the_model_s_positions_is_refused():
    from router_upcycling.settings.moe import MoESettings
    from router_upcycling.testing import qwen2_architecture
    from router_upcycling.train.source import ModelSource, check_fits_model

    arch, moe = qwen2_architecture(), MoESettings(num_experts=4)  # max_position_embeddings 4096
    source = ModelSource({}, arch, moe, None, "", None)
    check_fits_model(parse_args([*REQUIRED, "--train-iters", "1", "--seq-length", "4096"], on_this_machine=False), source)
    with pytest.raises(TrainError, match="--seq-length 8192 is longer than the model's 4096 positions"):
        check_fits_model(parse_args([*REQUIRED, "--train-iters", "1", "--seq-length", "8192"], on_this_machine=False), source)
