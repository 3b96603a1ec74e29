"""Writing outputs safely: all or nothing, and never over existing work without force.

Every folder or file a command writes is staged beside its destination and renamed into place when complete.
Stagings in progress are registered, so that a command stopped by a signal (router_upcycling.cli) removes them and
puts back an old output it was about to replace, whatever it was doing at that moment.
"""
import contextlib
import os
import shutil
import tempfile
from typing import Iterator, List, Optional

from router_upcycling.errors import UserError


class OutputExistsError(UserError):
    """The destination exists and replacing it was not asked for."""


class DiskFullError(UserError):
    """A write failed because its file system is full."""


LOW_SPACE_BYTES = 16 * 2**20  # a write that fails with less than this left is taken for a full disk
NOT_WRITE_FAILURES = (UserError, KeyboardInterrupt, SystemExit, GeneratorExit)


def _filesystem_of(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path) or "."
    return path


def disk_full_error(error: BaseException, path: str) -> Optional[DiskFullError]:
    """A DiskFullError naming `path` when `error` comes from a full file system, else None.

    ENOSPC anywhere in the exception chain, or any failure while the file system has almost nothing left: writers in
    other processes (megatron-core's checkpoint writer) report a full disk only as an unexpected file position.
    """
    import errno

    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left on device" in str(seen):
            break
        seen = seen.__cause__ or seen.__context__
    free = shutil.disk_usage(_filesystem_of(path)).free
    if seen is None and free >= LOW_SPACE_BYTES:
        return None
    return DiskFullError(f"the disk is full: writing {path} failed with {free / 2**20:.1f} MiB left on its file system; "
                         "nothing half-written was kept")


def refuse_existing(output: str, force: bool) -> None:
    """The one refusal of an existing output (file or folder) that --force was not given to replace."""
    if os.path.exists(output) and not force:
        raise OutputExistsError(f"output {os.path.abspath(output)} exists; pass --force to replace it")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _Staging:
    """A staging folder or file on its way to `output`; `retired` holds an old output while it is replaced."""

    def __init__(self, staging: str, output: Optional[str] = None) -> None:
        self.staging, self.output, self.retired = staging, output, None

    def abandon(self) -> None:
        """Remove what is half-written and put back what was there before (a command stopped mid-way)."""
        if os.path.isdir(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)
        elif os.path.exists(self.staging):
            os.remove(self.staging)
        if self.retired:
            old = os.path.join(self.retired, os.path.basename(self.output))
            if os.path.exists(old) and not os.path.exists(self.output):
                os.rename(old, self.output)  # stopped between moving the old output away and the new one in
            shutil.rmtree(self.retired, ignore_errors=True)


_ACTIVE: List[_Staging] = []


def abandon_staged_outputs() -> None:
    """Undo every staging in progress (called by a stop signal's handler before the process exits)."""
    while _ACTIVE:
        _ACTIVE.pop().abandon()


@contextlib.contextmanager
def _registered(staging: _Staging) -> Iterator[_Staging]:
    _ACTIVE.append(staging)
    try:
        yield staging
    except BaseException as error:  # torch's CheckpointException, which a full disk raises, is a BaseException
        full = None if isinstance(error, NOT_WRITE_FAILURES) else disk_full_error(error, staging.output or staging.staging)
        staging.abandon()
        if full:
            raise full from None
        raise
    finally:
        if staging in _ACTIVE:
            _ACTIVE.remove(staging)


@contextlib.contextmanager
def staged_output(output_dir: str, force: bool) -> Iterator[str]:
    """A temporary folder beside output_dir that replaces it only when the body finishes without error.

    On any error (or Ctrl-C, or a stop signal) the temporary folder is removed and an existing output_dir is
    untouched.
    """
    output_dir = os.path.abspath(output_dir)
    refuse_existing(output_dir, force)
    parent, name = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp makes it private; the output should not be
    with _registered(_Staging(staging, output_dir)) as state:
        yield staging
        if os.path.exists(output_dir):
            state.retired = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(output_dir, os.path.join(state.retired, name))
            os.rename(staging, output_dir)
            shutil.rmtree(state.retired)
            state.retired = None
        else:
            os.rename(staging, output_dir)


def readable_by_all(path: str) -> None:
    """Give a file the mode the umask allows (writers that keep files private, such as safetensors, make 0600)."""
    os.chmod(path, 0o666 & ~_current_umask())


@contextlib.contextmanager
def staging_folder(parent: str, prefix: str) -> Iterator[str]:
    """A temporary folder under `parent` for files the body moves into place itself; always removed at the end."""
    folder = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with _registered(_Staging(folder)):
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staged_file(path: str) -> Iterator[str]:
    """A temporary file name beside `path` (same suffix) that replaces `path` only when the body finishes without
    error; on any error the temporary file is removed and an existing file is untouched. Readers see the old file
    or the new one."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=os.path.splitext(name)[1], dir=parent)
    os.close(handle)
    with _registered(_Staging(tmp)):
        yield tmp
        readable_by_all(tmp)  # mkstemp makes it private; the output should not be
        os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    """Write a file through a temporary file beside it and a rename: readers see the old file or the new one."""
    with staged_file(path) as tmp, open(tmp, "w") as file:
        file.write(text)
