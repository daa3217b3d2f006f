"""Start-up failures as one line: what went wrong, never a traceback, unless it is a bug.

An *expected* error is bad input: a ValueError (our config checks, pydantic, a checkpoint that
lacks tensors, a KV cache that does not fit), a missing or unreadable file, memory that is too
small for the model. Its message already names the field, the value and what is accepted, so the
user gets exactly that line. Anything else is *unexpected* (a bug): the user gets its type and
message on one line plus a hint to rerun with debug logging, which prints the traceback.

Processes that fail while starting (the engine process, worker ranks) send `describe(e)` to their
parent, which prints it once; they log the traceback only at DEBUG.
"""
from __future__ import annotations

def nearest(word: str, choices, cutoff: float = 0.65):
    """The accepted name `word` is most likely a misspelling of (difflib), or None: for the "did you mean"
    of unknown flags and keys. Words under 3 characters match too much to suggest anything."""
    import difflib
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff) if len(word) >= 3 else []
    return close[0] if close else None


DEBUG_HINT = "run with --log-level debug for the traceback"
API_DEBUG_HINT = "set logging to DEBUG, e.g. logging.basicConfig(level='DEBUG'), for the traceback"


class RankFailedError(RuntimeError):
    """Another rank (a worker process) failed; `expected` carries over whether its error was bad input."""

    def __init__(self, message: str, expected: bool = False):
        super().__init__(message)
        self.expected = expected


def is_expected(err: BaseException) -> bool:
    """Bad input (reported as its message alone) rather than a bug."""
    if isinstance(err, RankFailedError):
        return err.expected
    if isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                        MemoryError)):
        return True
    return type(err).__name__ == "OutOfMemoryError"  # torch.OutOfMemoryError: the model does not fit the GPU


def one_line(text: str) -> str:
    """`text` with its lines joined by spaces (a message some library wrapped over several lines)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def describe(err: BaseException) -> str:
    """One line: the message of an expected error, `Type: message` of any other."""
    message = one_line(str(err))
    if (is_expected(err) or isinstance(err, RankFailedError)) and message:  # a rank's message names its type
        return message
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
