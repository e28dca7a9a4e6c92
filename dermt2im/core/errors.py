"""One base for every error a person can act on.

``DermT2imError`` marks a problem with the input, the configuration or the state of a workdir, as
opposed to a bug: the CLI prints its message as one line (``error: ...``, exit code 2) instead of a
traceback, and Prefect tasks do not retry it. The message says what is wrong and what to do.
Each stage raises its own subclass (``IngestError``, ``TrainingError``, ...), which also keeps the
built-in base it always had (``ValueError`` or ``RuntimeError``), so existing ``except`` clauses hold.
"""

from __future__ import annotations


class DermT2imError(Exception):
    """A problem the user can fix; ``str(err)`` is the message to show them."""


class ConfigError(DermT2imError, ValueError):
    """A configuration problem, worded for the person who wrote the file."""


class ManifestError(DermT2imError, ValueError):
    """A manifest that cannot be read or written as asked."""


class DecodeError(DermT2imError, ValueError):
    """The bytes are not a usable image. ``str(err)`` is the quarantine reason."""
