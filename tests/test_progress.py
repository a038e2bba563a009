"""Progress bars: a handful of lines in a log file, tqdm's usual redraws on a terminal.

tqdm reads its clock from tqdm.std.time; a fake clock that the loop advances makes "minutes of
work" run in milliseconds, so the number of redraws is deterministic.
"""

import io
import sys

import pytest
import torch
from torch import nn

from intradistill_kernels import _progress
from intradistill_kernels import sensitivity as S

tqdm_std = pytest.importorskip("tqdm.std")


class Stream(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


@pytest.fixture
def clock(monkeypatch):
    """A fake clock in seconds, advanced by the test; tqdm's monitor thread (real time) is off."""
    now = [1000.0]
    monkeypatch.setattr(tqdm_std, "time", lambda: now[0])
    monkeypatch.setattr(tqdm_std.tqdm, "monitor_interval", 0)
    return now


def _redraws(text: str) -> int:
    return text.count("\r")  # tqdm starts every redraw of a line with a carriage return


def _run_bar(stream, clock, steps=2000, seconds_per_step=0.25):
    bar = _progress.progress_bar(range(steps), file=stream, desc="train")
    for i in bar:
        clock[0] += seconds_per_step
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")  # a postfix every step, as training loops do
    return stream.getvalue()


def test_log_file_gets_a_handful_of_lines(clock):
    text = _run_bar(Stream(terminal=False), clock)
    # 500 s of fake work at one redraw per LOG_MIN_INTERVAL (20 s), plus the first and the last
    assert 5 <= _redraws(text) <= 500 / _progress.LOG_MIN_INTERVAL + 3, text
    assert "2000/2000" in text.rsplit("\r", 1)[-1] and text.endswith("\n")  # the final line is kept


def test_terminal_keeps_tqdm_behaviour(clock):
    text = _run_bar(Stream(terminal=True), clock)
    assert _redraws(text) >= 2000  # every step is 0.25 s, above tqdm's 0.1 s: each one redraws


def test_log_file_keeps_the_final_line_of_a_transient_bar(clock):
    stream = Stream(terminal=False)
    for _ in _progress.progress_bar(range(7), file=stream, leave=False, desc="eval"):
        clock[0] += 1
    assert "7/7" in stream.getvalue().rsplit("\r", 1)[-1]


def test_explicit_interval_wins(clock):
    stream = Stream(terminal=False)
    for _ in _progress.progress_bar(range(100), file=stream, mininterval=0):
        clock[0] += 1
    assert _redraws(stream.getvalue()) >= 100


@pytest.mark.parametrize("enabled", [None, False])
def test_hidden_bars_write_nothing_off_a_terminal(clock, enabled):
    stream = Stream(terminal=False)
    assert list(_progress.progress_bar(range(5), enabled=enabled, file=stream)) == list(range(5))
    assert stream.getvalue() == ""


def test_sensitivity_bar_in_a_log(clock, monkeypatch):
    """parameter_sensitivity(progress=True) with stderr redirected to a file: the bar redraws a few
    times over 300 s of batches, not once per batch."""
    stderr = Stream(terminal=False)
    monkeypatch.setattr(sys, "stderr", stderr)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(300)]

    def loss_fn(m, batch):
        clock[0] += 1.0  # each batch takes a second
        x, t = batch
        return ((m(x) - t) ** 2).mean()
    sens = S.parameter_sensitivity(model, loss_fn, batches, max_batches=300, progress=True)
    assert set(sens) == {"weight", "bias"}
    text = stderr.getvalue()
    assert 3 <= _redraws(text) <= 300 / _progress.LOG_MIN_INTERVAL + 3, text
    assert "300/300" in text


def test_without_tqdm_a_silent_stand_in(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # makes `from tqdm.auto import tqdm` fail
    bar = _progress.progress_bar(range(4), desc="x")
    assert list(bar) == [0, 1, 2, 3]
    manual = _progress.progress_bar(total=10)
    with manual:
        manual.update(3)
        manual.set_postfix(loss="0.1")
        manual.write("step 3: valid loss 1.0")
    out = capsys.readouterr()
    assert out.out == "step 3: valid loss 1.0\n" and out.err == ""
