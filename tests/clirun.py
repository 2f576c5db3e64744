"""Run `dspt ARGS` in this process and capture what it prints, leaving the dspt logger as it was."""
from __future__ import annotations

import contextlib
import io
import logging

from dspt import cli


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr)"""
    logger = logging.getLogger("dspt")
    saved = logger.handlers[:], logger.level, logger.propagate
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(args)
            except SystemExit as exc:
                code = exc.code
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    return code, out.getvalue(), err.getvalue()
