"""Other libraries' output goes to a log file, so that the first screen a user sees is hvtune's.

torch, torchao, bitsandbytes, transformers and diffusers print at import and load time: optional kernels that did not
load, deprecations, "experimental feature" notices, their own progress bars. None of it is actionable for a user,
and it buries hvtune's lines. `route_library_output` sends every log record and every warning that hvtune did not
raise into a log file (and also to the screen with `--verbose`), turns off transformers' and diffusers' progress
bars, and leaves hvtune's own output and warnings alone. Libraries install their own screen handlers when first
imported; `route_library_output` imports the noisy ones once (commands that load models import them anyway) and
takes those handlers away, so later records reach the file through the root logger.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

_OURS = str(Path(__file__).resolve().parent)
# imported in this order, each followed by adopting the loggers it configured: torch's handler must be gone before
# torchao (imported by transformers and diffusers) logs through it
_NOISY_IMPORTS = (
    "torch",
    "transformers",
    "diffusers",
    "diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5",
    "peft",
    "accelerate",
)


class _LogFile(logging.Handler):
    """Appends to a file created on the first record (its folder too); a write that fails is dropped silently,
    never printed over the user's screen."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.path = path
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(self.format(record) + "\n")
        except Exception:  # a log line is never worth a failed run
            pass


def _adopt_library_loggers() -> None:
    """Take the screen handlers away from every logger but hvtune's; their records propagate to the root."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.split(".")[0] == "hvtune":
            continue
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler or handler.__class__.__module__.startswith("torch"):
                logger.removeHandler(handler)
        logger.propagate = True


def route_library_output(log_file: Path | None, *, verbose: bool = False, preload: bool = False) -> None:
    """Send other libraries' warnings and log records to `log_file` (None: nowhere) and, with `verbose`, also to
    stderr. `preload`: import the noisy libraries now (for commands that load models), so their import-time output
    is routed too."""
    root = logging.getLogger()
    root.addHandler(_LogFile(log_file) if log_file else logging.NullHandler())
    if verbose:
        root.addHandler(logging.StreamHandler(sys.stderr))
    root.setLevel(logging.WARNING)
    shown = warnings.showwarning
    library_warnings = logging.getLogger("py.warnings")

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(_OURS):
            shown(message, category, filename, lineno, file, line)  # hvtune's own warnings stay on screen
        else:
            library_warnings.warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)

    warnings.showwarning = showwarning
    _adopt_library_loggers()
    if not preload:
        return
    import importlib

    for module in _NOISY_IMPORTS:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        finally:
            _adopt_library_loggers()
    if not verbose:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        diffusers_logging.disable_progress_bar()
