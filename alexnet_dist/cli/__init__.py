"""Thin command-line entry points: each parses arguments and wires library parts together."""

import errno
import sys
from functools import wraps

from ..errors import UserError

# A disk that filled up, a quota reached, a read-only mount: the user's to fix, not a bug.
STORAGE_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def one_line_errors(main):
    """Prints a UserError as a single `error:` line and exits 2 instead of a traceback.

    An error raised in a DataLoader worker comes back wrapped with the worker's traceback in its
    message; its last line is the original message."""

    @wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            message = lines[-1] if lines else type(exc).__name__
            for prefix in (
                "alexnet_dist.errors.DataError: ",
                "alexnet_dist.errors.ConfigError: ",
                "alexnet_dist.errors.UserError: ",
                "DataError: ",
                "ConfigError: ",
            ):
                message = message.removeprefix(prefix)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        except OSError as exc:
            if exc.errno not in STORAGE_FULL_OR_READ_ONLY:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            print(
                f"error: {where}{exc.strerror}; free space there or point the output elsewhere, then run the same "
                "command again (what was saved before is kept)",
                file=sys.stderr,
            )
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted (Ctrl-C); what was saved before is kept", file=sys.stderr)
            sys.exit(130)  # 128 + SIGINT, as the shell reports a process Ctrl-C ended

    return run
