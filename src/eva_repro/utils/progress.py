"""Progress bars for every long stage: a live bar on a terminal, plain lines elsewhere.

Off a terminal (a Slurm log, CI, `> train.log`) a redrawn bar becomes one line per update; there
`progress_bar` writes one plain line at most every PLAIN_INTERVAL_S seconds instead. Always on
stderr: stdout is for results (the JSON summaries), and metrics go to metrics.jsonl/TensorBoard.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 10.0
PLAIN_FORMAT = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, "
                "elapsed {elapsed}, eta {remaining}{postfix}")


class _Lines:
    """A file for tqdm that turns each carriage-return redraw into one finished line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.strip("\r\n")
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, *, file: TextIO | None = None, **kwargs: Any) -> tqdm:
    """tqdm on stderr, or the plain-line form when the stream is not a terminal."""
    stream = file if file is not None else sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.pop("dynamic_ncols", None)
        kwargs.update(file=_Lines(stream), mininterval=PLAIN_INTERVAL_S, maxinterval=1e9,
                      bar_format=PLAIN_FORMAT, ascii=True)
    else:
        kwargs.update(file=stream)
    return tqdm(iterable, **kwargs)
