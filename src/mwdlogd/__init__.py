"""mwdlogd: a log server for Web-protection Engines, built on Trio."""

import signal as _signal
import sys as _sys
from pathlib import PurePath as _PurePath

__version__ = "0.1.0"


def _is_server_command(argv: list[str]) -> bool:
    """`mwdlogd ... run ...` or `python -m mwdlogd ... run ...` (sys.orig_argv): read
    before argparse, so only a hint; `cli.main` releases the hold for any other command."""
    for start, word in enumerate(argv):
        entry = _PurePath(word).name == "mwdlogd" or (
            word == "-m" and argv[start + 1:start + 2] == ["mwdlogd"])
        if entry:
            return "run" in argv[start + 1:]
    return False


# Block SIGHUP at the first import, before the ~0.7 s of imports the command line needs:
# SIGHUP's default action ends the process, so one sent while the server starts (an
# operator reloading as it restarts) would kill it. The server takes it (delivered then)
# once it listens for it (signals.server_signals).
HELD_AT_IMPORT = _is_server_command(_sys.orig_argv) and _signal.SIGHUP not in (
    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGHUP}))


def release_start_up_hold() -> None:
    """Undo the hold above for commands other than the server (a `tail` must still end
    when its terminal closes); a SIGHUP blocked by the parent stays blocked."""
    if HELD_AT_IMPORT:
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {_signal.SIGHUP})
