"""The files of a Router Upcycling checkpoint folder (docs/checkpoint-format.md), read and written without torch.

A folder holds `router_upcycling.json` (architecture + router settings), `tokenizer/`, one
sub-folder per saved iteration (`release` or `iter_0000100`) and the tracker
`latest_checkpointed_iteration.txt`, which is written last so a half-written checkpoint is
never the one loaded. The torch_dist contents of an iteration folder are router_upcycling.mcore.checkpoint's.
"""
import json
import os
import shutil
from typing import TYPE_CHECKING, Iterator, Optional, Tuple

from router_upcycling.errors import UserError
from router_upcycling.files import read_json_object

if TYPE_CHECKING:
    from router_upcycling.settings.architecture import Architecture
    from router_upcycling.settings.moe import MoESettings

METADATA_FILE = "router_upcycling.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
TOKENIZER_DIR = "tokenizer"
RELEASE = "release"
FORMAT_VERSION = 1
STORAGE_DTYPE_NAMES = ("bf16", "fp32")  # the metadata's "dtype" (and the converter's --dtype): the stored precision


class CheckpointError(UserError):
    """A checkpoint folder that is missing, incomplete or not ours."""


class DamagedTracker(CheckpointError):
    """A tracker file that names no iteration (a preemption while it was written, a stray edit)."""


def iteration_dir_name(iteration) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


# the attribute of Megatron-LM's saved `args` that holds our metadata: the --spec sets it (router_upcycling.megatron_lm),
# so a --save folder of a user's own pretrain_gpt.py, which has no router_upcycling.json, still says what it holds
ARGS_METADATA = "router_upcycling"


def metadata_from_megatron_lm_args(checkpoint_dir: str) -> Optional[dict]:
    """Our metadata as the newest checkpoint's Megatron-LM `args` carry it, or None."""
    try:
        tracker = read_tracker(checkpoint_dir)
    except DamagedTracker:
        return None
    if tracker is None:
        return None
    try:
        from router_upcycling.mcore.checkpoint import common_state

        args = common_state(os.path.join(checkpoint_dir, iteration_dir_name(tracker))).get("args")
    except Exception:  # no megatron-core here, or an unreadable checkpoint: not one we can describe
        return None
    metadata = getattr(args, ARGS_METADATA, None)
    return dict(metadata) if isinstance(metadata, dict) else None


def read_metadata(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, METADATA_FILE)
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"checkpoint folder not found: {checkpoint_dir}")
    if not os.path.isfile(path):
        metadata = metadata_from_megatron_lm_args(checkpoint_dir)
        if metadata is None:
            raise CheckpointError(f"{checkpoint_dir} is not a Router Upcycling checkpoint (no {METADATA_FILE}, and no "
                                  "Megatron-LM checkpoint trained with our --spec)")
        return metadata
    metadata = read_json_object(path, CheckpointError)
    if "hf_config" not in metadata or "moe" not in metadata:
        raise CheckpointError(f"{path} is damaged: it lacks the hf_config or moe block")
    return metadata


def write_metadata(checkpoint_dir: str, metadata: dict) -> None:
    metadata = {"format_version": FORMAT_VERSION, **metadata}
    with open(os.path.join(checkpoint_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=False)


def copy_tokenizer(source_dir: str, checkpoint_dir: str) -> None:
    """Copy the tokenizer files of an HF folder (or a checkpoint's tokenizer/) into checkpoint_dir/tokenizer."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "added_tokens.json", "generation_config.json", "chat_template.jinja")
    target = os.path.join(checkpoint_dir, TOKENIZER_DIR)
    os.makedirs(target, exist_ok=True)
    for name in names:
        if os.path.isfile(os.path.join(source_dir, name)):
            shutil.copy2(os.path.join(source_dir, name), os.path.join(target, name))


def read_tracker(checkpoint_dir: str) -> Optional[str]:
    """The iteration named by the tracker ("release" or a number as text), None when absent; DamagedTracker when
    it names none."""
    path = os.path.join(checkpoint_dir, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        text = f.read(64).strip()
    if text != RELEASE and not text.isdigit():
        raise DamagedTracker(f"{path} is damaged: {text[:20]!r} names no iteration")
    return text


def write_tracker(checkpoint_dir: str, iteration) -> None:
    """Atomically point the tracker at a complete checkpoint."""
    path = os.path.join(checkpoint_dir, TRACKER_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(str(iteration))
    os.replace(path + ".tmp", path)


def saved_iterations(checkpoint_dir: str) -> list:
    """The iteration folders of a checkpoint folder (iter_XXXXXXX and release), newest first."""
    names = [name for name in os.listdir(checkpoint_dir) if name.startswith("iter_") or name == RELEASE] \
        if os.path.isdir(checkpoint_dir) else []
    return sorted(names, reverse=True)


def other_iterations_hint(kind: str, names: list) -> str:
    """The end of a refusal that names the iterations to pick instead (`kind`: saved, readable), or ""."""
    return f"; {kind}: {', '.join(names)} (choose one with --iteration N)" if names else ""


def resolve_iteration_dir(checkpoint_dir: str, iteration=None) -> str:
    """The folder of the requested iteration, or of the latest complete one (the tracker's)."""
    def saved() -> str:
        return other_iterations_hint("saved", [name for name in saved_iterations(checkpoint_dir)
                                               if os.path.isfile(os.path.join(checkpoint_dir, name, "metadata.json"))])

    if iteration is None:
        try:
            iteration = read_tracker(checkpoint_dir)
        except DamagedTracker as err:
            raise CheckpointError(f"{err}{saved()}") from None
        if iteration is None:
            raise CheckpointError(f"{checkpoint_dir} holds no complete checkpoint (no {TRACKER_FILE}){saved()}")
    path = os.path.join(checkpoint_dir, iteration_dir_name(iteration))
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"checkpoint {path} is missing or incomplete{saved()}")
    return path


def tracked_training_iteration(load_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """(the tracker's iteration folder name, None) or, when the tracker is missing or damaged, (None, why)."""
    try:
        tracked = read_tracker(load_dir)
    except DamagedTracker as err:
        return None, str(err)
    return (iteration_dir_name(tracked), None) if tracked is not None else (None, f"{os.path.join(load_dir, TRACKER_FILE)} is missing")


def readable_training_iterations(load_dir: str) -> Iterator[Tuple[str, Optional[str]]]:
    """(iteration folder name, why it does not load or None) of the saved training iterations a resume may use, newest
    first: those at or before the tracker's (later ones never completed), or all of them when the tracker is missing or
    damaged (a preemption while it was written: the iterations themselves are checked, with torch, imported only
    when there is an iteration to check)."""
    newest, _ = tracked_training_iteration(load_dir)
    for name in saved_iterations(load_dir):
        if name == RELEASE or (newest is not None and name > newest):
            continue
        from router_upcycling.mcore.checkpoint import iteration_problem

        yield name, iteration_problem(os.path.join(load_dir, name))


def holds_training_checkpoint(load_dir: str) -> bool:
    """Whether --load has a training iteration to resume: the tracker names one, or a missing or damaged tracker left
    iteration folders of which one reads."""
    newest, _ = tracked_training_iteration(load_dir)
    if newest is not None:
        return newest != RELEASE
    return any(problem is None for _, problem in readable_training_iterations(load_dir))


def read_checkpoint_settings(checkpoint_dir: str) -> "tuple[dict, Architecture, MoESettings]":
    """(metadata, Architecture, MoESettings) of a checkpoint folder; CheckpointError when it cannot be read."""
    from router_upcycling.errors import SettingError
    from router_upcycling.settings.architecture import Architecture, ArchitectureError
    from router_upcycling.settings.moe import MoESettings

    metadata = read_metadata(checkpoint_dir)
    try:
        return metadata, Architecture.from_hf_config(metadata["hf_config"]), MoESettings.from_dict(metadata["moe"])
    except (ArchitectureError, SettingError, TypeError) as err:
        raise CheckpointError(f"{os.path.join(checkpoint_dir, METADATA_FILE)}: {err}") from None
