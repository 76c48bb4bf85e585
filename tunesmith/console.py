"""What the console shows: tunesmith's own lines, and from libraries only what matters to this run.

Libraries announce things on import, or on paths every run takes, whether or not the run uses them. On a CPU
machine every run printed three such lines; each is hidden here, with the rule that hides it:

- bitsandbytes, imported by peft and transformers whenever it is installed, says on a CPU that an optional
  kernel-hub speed-up could not load ("Failed to load CPU gemm_4bit_forward from kernels-community"). Its warnings
  are hidden unless the run quantizes or uses an 8-bit optimizer (`show_library_warnings("bitsandbytes")`).
- DeepSpeed, imported by transformers and accelerate whenever it is installed, says "Setting accelerator to CPU"
  on every machine without a GPU. Its warnings are hidden unless the run uses DeepSpeed.
- FutureWarning and DeprecationWarning (transformers 5's "`is_gradient_checkpointing` is deprecated", raised when
  peft reads the old name) are about library functions that tunesmith's code calls: news for tunesmith's
  developers, which nothing in a user's config can change.

Errors from these libraries always show. `--verbose` shows everything, as the libraries would on their own.
Applied once, at the start of the command (`tunesmith.cli.main`), before the libraries are imported.
"""

from __future__ import annotations

import logging
import warnings

# Loggers whose warnings are noise unless the run uses the library: logger name → why it is hidden.
QUIET_LOGGERS: dict[str, str] = {
    "bitsandbytes": "imported whenever installed; on a CPU it reports a missing optional kernel",
    "DeepSpeed": "imported whenever installed; it announces the CPU accelerator on every machine without a GPU",
}
QUIET_WARNING_CATEGORIES = (FutureWarning, DeprecationWarning)


class _ErrorsOnly(logging.Filter):
    """Let a library's errors through and nothing below them.

    A filter rather than a level: DeepSpeed sets its logger's level itself when it is imported, which would undo
    ours; filters stay. bitsandbytes logs through child loggers without handlers, whose records a filter on the
    parent never sees, so the parent's level is set as well (children without a level of their own inherit it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_ERRORS_ONLY = _ErrorsOnly()


def configure(verbose: bool) -> None:
    """Hide library noise (the default), or show everything (`--verbose`). Safe to call again."""
    for name in QUIET_LOGGERS:
        if verbose:
            show_library_warnings(name)
        else:
            logger = logging.getLogger(name)
            logger.addFilter(_ERRORS_ONLY)  # adding the same filter twice keeps one
            logger.setLevel(logging.ERROR)
    for category in QUIET_WARNING_CATEGORIES:
        if verbose:
            warnings.filterwarnings("default", category=category)
        else:
            warnings.filterwarnings("ignore", category=category)


def show_library_warnings(name: str) -> None:
    """The run uses this library (one of QUIET_LOGGERS): its warnings matter now and are shown."""
    logger = logging.getLogger(name)
    logger.removeFilter(_ERRORS_ONLY)
    if logger.level == logging.ERROR:
        logger.setLevel(logging.NOTSET)  # DeepSpeed's own WARNING level is gone by now; NOTSET shows the same
