"""Shared command-line behaviour: one way to fail (a user mistake is one `error: ...` line on stderr and exit
status 2), one way to stop on a signal (SIGTERM from Slurm's scancel or a time limit, SIGINT from Ctrl-C: the
command's worker processes are stopped, its staging folder removed, any previous output kept, one line and exit
status 128 + the signal), argparse that fails the same way, and readable logs."""
import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Callable, Mapping, NoReturn, Optional

from router_upcycling.errors import SettingError, UserError

USER_ERROR_STATUS = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_worker_processes(timeout: float = 5.0) -> None:
    """Terminate this process's children and theirs (megatron-core's checkpoint writers, tokenizer pools, a
    multiprocessing manager), then kill what is left after `timeout` seconds: none may outlive the command."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=timeout)


def stopped_message(signum: int) -> str:
    return f"stopped by {signal.Signals(signum).name}: nothing half-written was left behind"


_HANDLER_PID = None  # the process that installed _stop


def _stop(signum, frame) -> None:
    """Stop now, from wherever the command is: an exception raised here could land in a finalizer and be ignored.

    The workers go first (a writer still writing could recreate what is removed), then every staging in progress
    (router_upcycling.outputs: an old output being replaced is put back), then the process, 128 + the signal."""
    from router_upcycling.outputs import abandon_staged_outputs

    for sig in STOP_SIGNALS:  # a second signal while stopping must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    if os.getpid() != _HANDLER_PID:  # a forked worker (a pool, a checkpoint writer) inherited the handler: the
        os._exit(128 + signum)       # command's own process cleans up and says so, once
    stop_worker_processes()
    abandon_staged_outputs()
    stop_worker_processes(timeout=1.0)  # a pool may have replaced a worker meanwhile
    if _progress_bar_showing():
        sys.stderr.write("\n")  # a bar's line has no end of its own
    print(stopped_message(signum), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _progress_bar_showing() -> bool:
    tqdm = getattr(sys.modules.get("tqdm.std"), "tqdm", None)
    return any(not bar.disable for bar in list(getattr(tqdm, "_instances", None) or ()))


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT stop the command (_stop) for the duration; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _HANDLER_PID
    _HANDLER_PID = os.getpid()
    previous = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fail(message: str) -> NoReturn:
    """Report a user mistake: `error: <message>` as one line on stderr, exit status 2."""
    print(f"error: {' '.join(str(message).split(chr(10)))}", file=sys.stderr)
    sys.exit(USER_ERROR_STATUS)


@contextlib.contextmanager
def user_errors(flags: Optional[Mapping[str, str]] = None):
    """Turn a UserError into `error: <message>` on stderr and exit status 2; a SettingError names the field by this
    command's flag (`flags`: field -> flag). SIGTERM and SIGINT stop the command (stop_on_signals): one line,
    status 128 + the signal."""
    try:
        with stop_on_signals():
            yield
    except SettingError as err:
        fail(str(err.as_flag(flags or {})))
    except UserError as err:
        fail(str(err))
    except KeyboardInterrupt:  # raised by Python's own handler, outside stop_on_signals
        print(stopped_message(signal.SIGINT), file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def run_command(body: Callable[[], Optional[int]], flags: Optional[Mapping[str, str]] = None) -> int:
    """Run a command's body with readable logs and the one way to fail; its exit status (0 when it returns None)."""
    setup_logging()
    with user_errors(flags):
        return body() or 0


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose bad-flag message is the same one `error: ...` line as every other user error (no usage block)."""

    def error(self, message: str):
        fail(f"{message} (see --help)")


def setup_logging(verbose: bool = False) -> None:
    """Our own progress at INFO; megatron-core's and transformers' chatter only when it matters."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("router_upcycling").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # megatron-core warns about missing Apex/Transformer Engine and deprecated defaults on every import
        warnings.filterwarnings("ignore", module=r"megatron\.")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed")
        warnings.filterwarnings("ignore", category=FutureWarning)
