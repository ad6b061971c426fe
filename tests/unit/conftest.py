"""Fixtures shared by the unit tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from vmm import logger as vmm_logger


@pytest.fixture
def restore_vmm_logger() -> Iterator[None]:
    """Put back the "vmm" logger's handlers, level and propagation after each test."""
    logger = logging.getLogger(vmm_logger.LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if handler not in saved[0]:
            handler.close()
    for handler in saved[0]:
        logger.addHandler(handler)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
