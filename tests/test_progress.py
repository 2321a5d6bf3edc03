"""Progress output: a live bar on a terminal, a plain line every few seconds elsewhere."""

import io

import tqdm.std

from eva_repro.utils import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_a_run_writes_a_few_plain_lines_not_one_per_step(monkeypatch):
    clock = iter(range(10**6))  # a fake clock: each reading is one second later
    monkeypatch.setattr(tqdm.std, "time", lambda: next(clock))
    log = io.StringIO()
    with progress.progress_bar(total=600, desc="train", unit="step", file=log) as bar:
        for _ in range(600):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    # minutes of fake time at one line per PLAIN_INTERVAL_S (not 600 redraws)
    assert 5 <= len(lines) <= 600 / progress.PLAIN_INTERVAL_S + 3
    assert lines[-1].startswith("train: 600/600 step (100%)")


def test_on_a_terminal_it_is_tqdm_redrawing_in_place():
    tty = Terminal()
    with progress.progress_bar(total=3, desc="extract", file=tty) as bar:
        bar.update(3)
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()
