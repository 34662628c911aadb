"""The errors of the model process, and how they cross its pipe: as types, never as strings.

The child answers a request it cannot serve with a ``Failure``: the code of the error's class and
its message. The node raises the class that code names, so a caller handles a case by catching
its type (the serving endpoint turns ``ContextTooLong`` into a 400) and never searches a message.
An exception of any other class in the child (a ``KeyError``, a torch error) arrives as a plain
``ModelError`` whose message names the original class.

    ValueError
    └── ModelError           the model process could not do what was asked; the message says why
        ├── ContextTooLong   the prompt plus ``max_tokens`` does not fit the model's context
        ├── ModelGone        the model process exited before it answered
        └── Cancelled        the caller left: the request was skipped or its generation ended

They are ``ValueError``s, so a role's "this node cannot serve that" stays one ``except
ValueError`` (an environment or adapter it lacks, a model that cannot load).

>>> Failure.of(ContextTooLong("too long")).error()
ContextTooLong('too long')
>>> Failure.of(KeyError("arith-9")).error()
ModelError("KeyError: 'arith-9'")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


class ModelError(ValueError):
    """The model process could not do what was asked; the message says why."""

    code: ClassVar[str] = "model_error"


class ContextTooLong(ModelError):
    """The prompt plus ``max_tokens`` does not fit the model's context."""

    code = "context_too_long"


class ModelGone(ModelError):
    """The model process exited (or its pipe broke) before it answered."""

    code = "model_gone"


class Cancelled(ModelError):
    """The caller left (its cancel flag, ``worker.py``): skipped, or ended at a token."""

    code = "cancelled"


ERRORS: dict[str, type[ModelError]] = {
    e.code: e for e in (ModelError, ContextTooLong, ModelGone, Cancelled)
}
"""Every error that crosses the pipe, by its code."""


@dataclass(frozen=True)
class Failure:
    """A request the model process could not serve, as the child sends it back."""

    code: str
    """Which ``ModelError`` class the node raises (``ERRORS``)."""
    message: str

    @classmethod
    def of(cls, e: BaseException) -> Failure:
        if isinstance(e, ModelError):
            return cls(e.code, str(e))
        return cls(ModelError.code, f"{type(e).__name__}: {e}")

    def error(self) -> ModelError:
        return ERRORS[self.code](self.message)
