"""One check's verdict, as the report card lists it."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Check:
    """`passed` None: not applicable (a declared design property, or too few tokens)."""

    name: str
    group: str  # interface | learning | control | distribution
    passed: bool | None
    value: float | None
    threshold: str
    meaning: str  # what a failure means
    detail: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["value"], float):
            d["value"] = round(d["value"], 6)
        return d

    @property
    def mark(self) -> str:
        return {True: "pass", False: "FAIL", None: "n/a"}[self.passed]
