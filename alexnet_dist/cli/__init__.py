"""Thin command-line entry points: each parses arguments and wires library parts together."""

import difflib
import errno
import re
import sys
from functools import wraps
from pathlib import Path

from ..credentials import credentials_in, redact
from ..errors import ConfigError, UserError

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
            kind = type(exc)
            for prefix in (
                f"{kind.__module__}.{kind.__qualname__}: ",  # a subclass (store.Unreachable) from a worker
                "alexnet_dist.errors.DataError: ",
                "alexnet_dist.errors.ConfigError: ",
                "alexnet_dist.errors.UserError: ",
                "DataError: ",
                "ConfigError: ",
            ):
                message = message.removeprefix(prefix)
            print(f"error: {redact(message)}", file=sys.stderr)  # no credential a location carried
            sys.exit(2)
        except OSError as exc:
            if exc.errno not in STORAGE_FULL_OR_READ_ONLY:
                raise
            where = f"{redact(str(exc.filename))}: " if exc.filename else ""
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


def credentials_problem(argv: list[str]) -> str | None:
    """One line for a command-line item naming a location that carries a credential (a user name
    or password, a presigned query, a token), shown as ***; None when none does. Checked before a
    command writes anything (Hydra's .hydra/overrides.yaml keeps every override as it was typed)."""
    for i, item in enumerate(argv):
        if why := credentials_in(item):
            option = argv[i - 1] + " " if i and argv[i - 1].startswith("--") and "=" not in argv[i - 1] else ""
            return f"{option}{redact(item)}: {why}"
    return None


def refuse_credentials(argv: list[str]) -> None:
    """ConfigError for a command line that names a location with a credential (credentials_problem)."""
    if problem := credentials_problem(argv):
        raise ConfigError(problem)


def config_problem(argv: list[str], config_name: str = "train") -> str | None:
    """One line for what Hydra would otherwise take and write into .hydra/: a command-line override
    that sets a key no config has (Hydra's own report is five lines), naming the nearest key that
    exists; or a config file's value naming a location with a credential. None when neither."""
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself reads argv with
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from ..config import credentials_setting, flat

    args, _ = get_args_parser().parse_known_args(argv)
    if args.multirun or args.help or args.hydra_help:
        return None  # a sweep's values are checked by each job; Hydra prints the help
    overrides = list(args.overrides)
    if args.config_dir:  # --config-dir DIR: the user's groups and experiments too
        overrides.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    try:
        with initialize_config_module("alexnet_dist.conf", version_base="1.3"):
            composed = compose(args.config_name or config_name, overrides=overrides)
            return credentials_setting(OmegaConf.to_container(composed))
    except HydraException as exc:
        wrong = re.match(r"Could not override '([^']+)'", str(exc))
        if not wrong:
            return None  # another problem: Hydra's own message says it
        key = wrong.group(1)
        rest = [o for o in overrides if not o.startswith(f"{key}=")]
        with initialize_config_module("alexnet_dist.conf", version_base="1.3"):
            keys = list(flat(OmegaConf.to_container(compose(args.config_name or config_name, overrides=rest))))
    nearest = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"the nearest is {nearest[0]}" if nearest else "alexnet-train --cfg job prints every key"
    # model.* and trainer.* are open (a model's or the Trainer's arguments): a new key is added with +
    new = f", or add it with +{key}=VALUE" if key.split(".")[0] in ("model", "trainer") else ""
    return f"{key}: no such setting ({hint}); fix the spelling{new}"


def hydra_command(hydra_main, config_name: str = "train"):
    """A Hydra entry point that answers a misspelt key, or a location with a credential, in one
    `error:` line (exit status 2) before Hydra writes anything."""

    @wraps(hydra_main)
    def run():
        if problem := credentials_problem(sys.argv[1:]) or config_problem(sys.argv[1:], config_name):
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        return hydra_main()

    return run


def key_values(schema: type, doc: str, argv: list[str]):
    """The KEY=VALUE settings of a command (alexnet-eval, -export, -predict) as `schema`; with -h
    or --help, prints `doc` and every key with its default and returns None."""
    from ..config import describe, from_command_line

    if argv and argv[0] in ("-h", "--help"):
        print(f"{doc}\nThe settings and their defaults:\n{describe(schema)}")
        return None
    refuse_credentials(argv)
    return from_command_line(schema, argv)
