"""How the data commands end: a user's mistake is one line on stderr, never a traceback.

Exit status: 0 done; 2 bad input (a flag, a path, a corpus, a folder it will not replace),
named by the line `error: ...`; 130 interrupted (Ctrl-C; the output folder is unchanged).
`--verbose` shows the traceback as well.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from absl import app, flags

BAD_INPUT = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report it

FLAGS = flags.FLAGS


def fail(message: str, status: int) -> None:
    """Ends the command with `error: MESSAGE` on stderr and exit `status` (every command's way)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def parse_flags(argv: list[str], positional: int = 0) -> list[str]:
    """absl's parser, with an unknown or malformed flag, or more than `positional` arguments
    that are not flags, reported in one line."""
    try:
        rest = FLAGS(argv)
    except flags.Error as error:
        fail(f"{error} (see --help)", BAD_INPUT)
    if len(rest) > 1 + positional:
        extra = rest[1 + positional :]
        fail(f"unexpected arguments {extra}: every option is a --flag (see --help)", BAD_INPUT)
    return rest


def run(main: Callable[[], None]) -> None:
    """Parses the flags defined so far plus --verbose, runs `main`, ends as described above.

    ValueError (bad input, CorpusError included) and OSError (a path that is missing, not
    writable, or not ours to replace) are the user's to fix."""
    flags.DEFINE_bool("verbose", False, "show the traceback of an error, not just its line")

    def guarded(argv: list[str]) -> None:
        del argv
        if not FLAGS.verbose:  # TFDS' writer logs every shard it writes at INFO
            logging.getLogger("absl").setLevel(logging.WARNING)
        try:
            main()
        except (ValueError, OSError) as error:
            if FLAGS.verbose:
                raise
            fail(str(error), BAD_INPUT)
        except KeyboardInterrupt:
            if FLAGS.verbose:
                raise
            fail("interrupted", INTERRUPTED)

    app.run(guarded, flags_parser=parse_flags)
