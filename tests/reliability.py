"""What the fault and bad-input tests saw, for RELIABILITY.md (tests/make_reliability_report.py).

Tests call ``record(area, case, outcome)`` with what actually happened (the error message, the exit code,
the count of skipped files...). Nothing is written unless LOHA_RELIABILITY_LOG names a JSON-lines file, so
the normal test run is unaffected.
"""

from __future__ import annotations

import json
import os
from collections import Counter

LOG_ENV = "LOHA_RELIABILITY_LOG"


def record(area: str, case: str, outcome: str, detail: str = ""):
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    row = {"area": area, "case": case, "outcome": outcome, "detail": detail, "test": test}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


class Tally:
    """Outcomes over the examples of one property test, recorded as one row when the test ends."""

    def __init__(self, area: str, case: str):
        self.area, self.case = area, case
        self.outcomes: Counter = Counter()
        self.messages: Counter = Counter()
        self.slowest_s = 0.0

    def add(self, outcome: str, message: str = "", seconds: float = 0.0):
        self.outcomes[outcome] += 1
        if message:
            # group messages by their wording, not by the key/number they name
            self.messages[_message_kind(message)] += 1
        self.slowest_s = max(self.slowest_s, seconds)

    def save(self):
        total = sum(self.outcomes.values())
        counts = ", ".join(f"{n} {o}" for o, n in self.outcomes.most_common())
        kinds = "; ".join(f"{k} (x{n})" for k, n in self.messages.most_common(6))
        record(self.area, self.case, f"{total} examples: {counts}; slowest {self.slowest_s:.2f} s",
               f"most frequent refusals: {kinds}" if kinds else "")


def _message_kind(message: str) -> str:
    words = message.split(": ", 1)[-1].split()
    return " ".join(w for w in words[:8] if not any(c.isdigit() for c in w) and "'" not in w)[:70]
