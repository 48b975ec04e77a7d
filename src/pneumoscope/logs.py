"""Logging for the command line: one handler, each line once, third-party chatter kept down."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_THIRD_PARTY = ("lightning", "lightning.pytorch", "lightning.fabric")
# Lightning advertises its cloud logger at every fit; not information a user acted on.
_ADVERTS = ("litlogger",)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(word in record.getMessage() for word in _ADVERTS)


def configure(verbose: bool = False) -> None:
    """One stderr handler on the root logger (DEBUG with ``verbose``, else INFO)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT,
                        datefmt="%H:%M:%S", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropAdverts())


def tame_lightning(verbose: bool = False) -> None:
    """Route Lightning's messages through the root handler only (it installs a handler of its own
    at import, so every line printed twice) and keep them at WARNING unless ``verbose``. Call it
    after Lightning is imported."""
    for name in _THIRD_PARTY:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
