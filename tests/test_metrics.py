"""mpips.metrics: numbers a person can read, the plain progress line, the final table."""

from __future__ import annotations

import io
import os
import sys

import pytest

from mpips import metrics
from mpips.metrics import Progress, format_table, on_terminal, readable


@pytest.mark.parametrize(("value", "text"), [
    (10010.4, "10,010"), (1234567, "1,234,567"), (123.456, "123.5"), (2.30812, "2.308"), (0.43125, "0.4313"),
    (0.0, "0"), (0.00001234, "1.23e-05"), (float("nan"), "nan"), ("x", "x"),
])
def test_readable_numbers(value, text):
    assert readable(value) == text


def test_progress_line_off_a_terminal_shows_readable_fields_every_n_steps(capsys):
    progress = Progress(total=20, every=10)  # pytest's stderr is not a terminal: plain lines
    for step in range(20):
        progress.update(step, loss=0.43125, samples_per_s=10010.4, staleness=2, data_wait_s=0.00041)
    progress.close()
    assert capsys.readouterr().out.splitlines() == [
        "step 10/20 loss 0.4313, samples/s 10,010, staleness 2, data wait 0.41 ms",
        "step 20/20 loss 0.4313, samples/s 10,010, staleness 2, data wait 0.41 ms",
    ]


def test_final_table_has_no_exponents():
    table = format_table({"held-out accuracy": 0.98333, "samples/s (all workers)": 10010.4, "steps": 690}, "t")
    assert "0.9833" in table and "10,010" in table and "e+" not in table


def test_a_terminal_is_a_tty_with_a_width_as_open_mpi_gives_ranks_one():
    import fcntl
    import struct
    import termios

    assert not on_terminal(io.StringIO())
    main, tty = os.openpty()
    try:
        with os.fdopen(tty, "w", closefd=False) as stream:
            # mpirun writing to a file or a pipe: the rank's stdout is still a pty, of width 0
            fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
            assert stream.isatty() and not on_terminal(stream)
            fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))  # mpirun on a terminal
            assert on_terminal(stream)
    finally:
        os.close(main)
        os.close(tty)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_shows_the_same_fields_and_keeps_printed_lines_whole(monkeypatch):
    out = _Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(metrics, "on_terminal", lambda stream: stream is out)  # a StringIO has no width
    progress = Progress(total=4, every=1)
    assert progress.bar is not None
    for step in range(4):
        progress.update(step, samples_per_s=10010.4, staleness=2, data_wait_s=0.00041)
        if step == 1:
            progress.write("eval step 2: held-out loss 0.5000 accuracy 0.9000")
    progress.close()
    text = out.getvalue()
    assert "samples/s=10,010" in text and "staleness=2" in text and "data wait=0.41 ms" in text
    assert "4/4" in text
    assert "\neval step 2: held-out loss 0.5000 accuracy 0.9000\n" in text.replace("\r", "\n")
