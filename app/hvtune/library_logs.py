"""Other libraries' output goes to a log file, so that the first screen a user sees is hvtune's.

torch, torchao, bitsandbytes, transformers and diffusers print at import and load time: optional kernels that did not
load, deprecations, "experimental feature" notices, their own progress bars. None of it is actionable for a user,
and it buries hvtune's lines. `route_library_output` sends every log record and every warning that hvtune did not
raise into a log file (and also to the screen with `--verbose`), turns off transformers' and diffusers' progress
bars, and leaves hvtune's own output and warnings alone. Libraries install their own screen handlers when they are
imported, which hvtune does late (inside the functions that need them: a fully cached `hvtune cache` never imports
torch), so an import hook takes those handlers away as each noisy library finishes importing; their records then
reach the file through the root logger.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import warnings
from pathlib import Path

_OURS = str(Path(__file__).resolve().parent)
_NOISY = {"torch", "torchao", "bitsandbytes", "transformers", "diffusers", "accelerate", "peft", "huggingface_hub"}


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
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `after(name)` once a noisy library's top-level module has been executed (its handlers are installed)."""

    def __init__(self, after):
        self.after = after

    def find_spec(self, name, path, target=None):
        if name not in _NOISY:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _AfterImport) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module

                def exec_module(module, run=run):
                    try:
                        run(module)
                    finally:
                        self.after(name)

                spec.loader.exec_module = exec_module
                return spec
            if spec is not None:
                return spec
        return None


def route_library_output(log_file: Path | None, *, verbose: bool = False) -> None:
    """Send other libraries' warnings and log records to `log_file` (None: nowhere) and, with `verbose`, also to
    stderr; hvtune's own warnings and output stay on screen."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_hvtune_route", False)]:  # a second call replaces the first
        root.removeHandler(handler)
    handlers = [_LogFile(log_file) if log_file else logging.NullHandler()]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler._hvtune_route = True
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    shown = getattr(warnings.showwarning, "_hvtune_original", warnings.showwarning)
    library_warnings = logging.getLogger("py.warnings")

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(_OURS):
            shown(message, category, filename, lineno, file, line)  # hvtune's own warnings stay on screen
        else:
            library_warnings.warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)

    def after(name: str) -> None:
        _adopt_library_loggers()
        if verbose or name not in ("transformers", "diffusers"):
            return
        module = importlib.import_module(f"{name}.utils.logging")
        module.disable_progress_bar()  # "Loading weights" bars: hvtune shows its own progress

    showwarning._hvtune_original = shown
    warnings.showwarning = showwarning
    _adopt_library_loggers()
    for name in _NOISY & set(sys.modules):
        after(name)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]
    sys.meta_path.insert(0, _AfterImport(after))
