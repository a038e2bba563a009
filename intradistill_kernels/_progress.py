"""Progress bars that read well both on a terminal and in a log file.

tqdm redraws a bar up to ten times a second. On a terminal each redraw overwrites the last; in a
file (`make demo > log`, a batch job) every redraw stays, and a training run leaves thousands of
them. When the bar's stream is not a terminal, progress_bar() redraws at most every
LOG_MIN_INTERVAL seconds and keeps the final line, so a log holds a few lines per bar that show
the rate and the end state. tqdm is optional: without it the bar is a silent stand-in.
"""

from __future__ import annotations

import functools
import sys

# A redraw every 20 s keeps a several-minute run to a dozen lines, and still tells a reader of the
# log that the job is alive. tqdm's monitor thread forces a redraw of a stalled bar after
# maxinterval, which must therefore not be shorter than the redraw interval itself.
LOG_MIN_INTERVAL = 20.0
LOG_MAX_INTERVAL = 60.0


def is_terminal(stream=None) -> bool:
    """Whether `stream` (default sys.stderr, where tqdm writes) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class _SilentBar:
    """What progress_bar returns without tqdm: iterates, counts nothing, prints bar.write lines."""

    def __init__(self, iterable=None, **_):
        self.iterable = iterable

    def __iter__(self):
        return iter(() if self.iterable is None else self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_description(self, *args, **kwargs):
        pass

    def close(self):
        pass

    @staticmethod
    def write(s, file=None, end="\n", nolock=False):
        # tqdm.write's messages are log lines (e.g. validation results), not progress: keep them
        print(s, file=file, end=end)


def progress_bar(iterable=None, *, enabled: bool | None = True, **kwargs):
    """tqdm(iterable, **kwargs) with log-file friendly defaults when its stream is not a terminal.

    enabled: True shows the bar, False hides it, None shows it only on a terminal (tqdm's
    disable=None). On a stream that is not a terminal (`file=` or sys.stderr), mininterval and
    maxinterval default to LOG_MIN_INTERVAL / LOG_MAX_INTERVAL and the finished bar is left in
    place (leave=True whatever is asked: clearing a line means nothing in a file); explicit
    intervals win, and set_postfix / set_description wait for the next redraw instead of forcing
    one (a loop that sets a postfix every step would otherwise write every step). Notebook widgets
    (tqdm.auto in Jupyter) redraw in place and keep tqdm's defaults.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the package does not depend on tqdm; the examples' requirements do
        return _SilentBar(iterable)
    if not is_terminal(kwargs.get("file")) and not tqdm.__module__.startswith("tqdm.notebook"):
        kwargs.setdefault("mininterval", LOG_MIN_INTERVAL)
        kwargs.setdefault("maxinterval", max(LOG_MAX_INTERVAL, kwargs["mininterval"]))
        kwargs["leave"] = True
        tqdm = _log_file_bar(tqdm)
    return tqdm(iterable, disable=None if enabled is None else not enabled, **kwargs)


@functools.lru_cache(maxsize=None)
def _log_file_bar(tqdm):
    class LogFileBar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
            super().set_postfix(ordered_dict, refresh, **kwargs)

        def set_postfix_str(self, s="", refresh=False):
            super().set_postfix_str(s, refresh)

        def set_description(self, desc=None, refresh=False):
            super().set_description(desc, refresh)

    return LogFileBar
