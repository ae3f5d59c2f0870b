"""Errors that flashtier raises on bad input or faults.

Every error a user can trigger is a :class:`FlashtierError` whose message says what was wrong and
what to do. The CLI prints the message as one line on stderr and exits non-zero; no traceback.
Subsystems raise the most specific subclass and chain the cause (``raise ... from e``).
"""

from __future__ import annotations


class FlashtierError(Exception):
    """Base class: a problem the user can act on. ``str(err)`` is the whole message."""


class ConfigError(FlashtierError):
    """A configuration value (budget, flag, config.json field) is invalid."""


class CheckpointError(FlashtierError):
    """A checkpoint folder or file is missing, malformed, truncated or inconsistent."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's architecture is not one flashtier runs."""


class InputError(FlashtierError):
    """A request is invalid: token ids outside the vocabulary, a prompt longer than the context..."""


class BudgetError(FlashtierError):
    """A memory budget is smaller than what the model needs, or would be exceeded."""


class StorageError(FlashtierError):
    """A read or write on storage failed or returned fewer bytes than asked."""


class IntegrityError(StorageError):
    """Data read back does not match its checksum or manifest."""


class BusyError(FlashtierError):
    """A generation was started on a Model while one of its streams is still open on the same
    thread (it would wait for itself forever)."""


class NonFiniteError(FlashtierError):
    """A forward pass produced NaN or infinite activations (corrupt weights, or a model that
    overflows in the compute dtype): the layer is named instead of answering garbage."""
