"""The one error type of the package, and the one way an error becomes a line on a terminal.

Every refusal (bad input, an unprovable cut, a missing extension) raises a subclass of ShortGPTError whose message is
one line that says what is wrong and how to fix it. It is a ValueError, so callers that caught ValueError before keep
working; the CLI catches ShortGPTError alone and prints `one_line(err)`.
"""
from __future__ import annotations

# One error line quotes values from the command line and from files; beyond this it is cut rather than flooding the
# terminal (a 2-million-entry --layers list once produced a 17 MB line).
MAX_ERROR_CHARS = 500
# A quoted piece of untrusted text inside a message (a layer list, a tensor name).
MAX_QUOTE_CHARS = 120


class ShortGPTError(ValueError):
    """Base of every error this package raises on purpose; the message is one actionable line."""


def quote(value: object, limit: int = MAX_QUOTE_CHARS) -> str:
    """repr() of untrusted text, one line, at most `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 15] + f"...({len(text)} chars)"


def one_line(err: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """The first line of an error, naming the file for OS errors, cut at `limit` characters."""
    text = str(err).strip()
    message = text.splitlines()[0] if text else type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
        message += f": {err.filename}"
    if len(message) > limit:
        message = message[:limit] + f"... ({len(message) - limit} more characters)"
    return message
