"""The `crawler` console script: parse, run one command, turn every error into one line and its exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from crawler.cli.common import resume_hint
from crawler.cli.parser import parse
from crawler.engine.stats import LogHandler, silence
from crawler.errors import CrawlerError, Interrupted, UsageError, disk_error

log = logging.getLogger("crawler")


def _logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[LogHandler(sys.stderr)])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `crawler` console script."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["sim"]:  # every option (--help, --port ...) belongs to the simulator's own parser
        from crawler.sim.__main__ import main as sim_main

        return sim_main(words[1:], prog="crawler sim")
    args: argparse.Namespace | None = None
    try:
        args = parse(words)
        if not hasattr(args, "func"):
            raise UsageError("say which command (or query) to run: see crawler --help")
        _logging(getattr(args, "verbose", 0))
        func: Callable[[argparse.Namespace, Sequence[str]], int] = args.func
        return func(args, words)
    except Interrupted as exc:  # stopped before the run proper began (e.g. while reading the input)
        print(f"crawler: {exc}; resume with: {resume_hint(words)}", file=sys.stderr)
        return exc.code
    except CrawlerError as exc:
        print(f"crawler: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("crawler: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Our reader went away (a closed pipe) before the progress line noticed: nothing more to say, and no
        # traceback about it at exit.
        silence(sys.stdout)
        silence(sys.stderr)
        return 1
    except Exception as exc:
        return _failed(exc, args)


def _failed(exc: Exception, args: argparse.Namespace | None) -> int:
    """The one line of a run that ended by an exception the run did not name: a full disk or a read-only
    directory (the path and the fix), another OS error, else a bug (exit 1)."""
    where = getattr(args, "output", None) or getattr(args, "out_dir", None) or os.getcwd()
    problem = disk_error(exc, where)
    if problem is not None:
        print(f"crawler: {problem}", file=sys.stderr)
        return problem.exit_code
    if isinstance(exc, OSError):
        print(f"crawler: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    # a bug, not a user mistake: one line, the traceback only with -v
    leaf: BaseException = exc
    while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
        leaf = leaf.exceptions[0]
    log.debug("unexpected error", exc_info=exc)
    print(f"crawler: unexpected error: {type(leaf).__name__}: {leaf} (what was committed is kept; the same"
          " command resumes; -v shows the traceback; please report it)", file=sys.stderr)
    return 1
