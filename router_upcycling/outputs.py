"""Writing output folders safely: all or nothing, and never over existing work without force."""
import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from router_upcycling.errors import UserError


class OutputExistsError(UserError):
    """The destination exists and replacing it was not asked for."""


def refuse_existing(output: str, force: bool) -> None:
    """The one refusal of an existing output (file or folder) that --force was not given to replace."""
    if os.path.exists(output) and not force:
        raise OutputExistsError(f"output {os.path.abspath(output)} exists; pass --force to replace it")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_output(output_dir: str, force: bool) -> Iterator[str]:
    """A temporary folder beside output_dir that replaces it only when the body finishes without error.

    On any error (or Ctrl-C) the temporary folder is removed and an existing output_dir is untouched.
    """
    output_dir = os.path.abspath(output_dir)
    refuse_existing(output_dir, force)
    parent, name = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp makes it private; the output should not be
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(output_dir):
        retired = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rename(output_dir, os.path.join(retired, name))
        os.rename(staging, output_dir)
        shutil.rmtree(retired)
    else:
        os.rename(staging, output_dir)


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
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes it private; the output should not be
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Write a file through a temporary file beside it and a rename: readers see the old file or the new one."""
    with staged_file(path) as tmp, open(tmp, "w") as file:
        file.write(text)
