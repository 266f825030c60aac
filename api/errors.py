"""How the API answers each error of the product's tree: one table, looked up along the MRO.

A row gives the HTTP status and, for the pages a browser sees (the OAuth callback), the
page's title and sentence. The lookup walks the exception's MRO (as starlette does), so a
new subclass answers like its parent until it has a row of its own. The errors the API
raises itself (``BadRequestError``, ``UnauthorizedError``) are part of the tree in
flowengine/errors.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flowengine import errors as e

__all__ = [
    "ANSWERS",
    "Answer",
    "BadRequestError",
    "UnauthorizedError",
    "answer_for",
    "page_text",
    "status_for",
]

BadRequestError = e.BadRequestError
UnauthorizedError = e.UnauthorizedError

Page = Callable[[e.BrokerError], tuple[str, str]]

_AGAIN = "Start the connection again from the bot or the command line."
_ENDED = {"expired": "expired", "failed": "failed", "cancelled": "been cancelled"}


def _page(title: str, text: str) -> Page:
    return lambda _error: (title, text)


def _ended(error: e.BrokerError) -> tuple[str, str]:
    how = _ENDED.get(getattr(error, "state", ""), "ended")
    return ("This authorization has " + how, "Nothing was saved. " + _AGAIN)


@dataclass(frozen=True, slots=True)
class Answer:
    """How the API answers one class of error: our status, and the page a browser sees."""

    status: int
    page: Page = _page("Something went wrong", "The daemon could not record this authorization.")


_NOT_VALID = _page(
    "This link is not valid",
    "It does not belong to any authorization in progress, so nothing was saved. " + _AGAIN,
)

#: exception class -> answer; the first class on the MRO that is listed wins
ANSWERS: dict[type[BaseException], Answer] = {
    e.BadRequestError: Answer(400, lambda error: ("This link is not valid", error.message)),
    e.UnauthorizedError: Answer(401),
    e.RequestError: Answer(400),
    e.StateMismatchError: Answer(400, _NOT_VALID),
    e.FlowNotFound: Answer(404, _NOT_VALID),
    e.FlowExpiredError: Answer(410, _ended),
    e.CodeAlreadyUsedError: Answer(
        410,
        _page(
            "This link was already used",
            "The authorization was completed before; nothing new was saved. "
            "You can close this tab.",
        ),
    ),
    e.InvalidTransition: Answer(409),
    e.ConcurrentUpdateError: Answer(409),
    e.FlowError: Answer(400),
    e.UnknownProviderError: Answer(404),
    e.DiscoveryError: Answer(400),
    e.ConfigError: Answer(500),
    e.CredentialsMissingError: Answer(409),
    e.NotConnectedError: Answer(409),
    e.ReauthorizationRequired: Answer(409),
    e.ProviderTransientError: Answer(503),
    e.ProviderError: Answer(502),
    e.TailscaleError: Answer(503),
    e.StorageError: Answer(503),
    e.BrokerError: Answer(500),
}

_UNEXPECTED = Answer(500)


def answer_for(error: BaseException) -> Answer:
    return e.by_class(ANSWERS, error, _UNEXPECTED)


def status_for(error: BaseException) -> int:
    return answer_for(error).status


def page_text(error: e.BrokerError) -> tuple[str, str]:
    """Title and sentence of an error page (escaped by the template)."""
    return answer_for(error).page(error)
