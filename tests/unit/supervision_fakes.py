"""Stand-ins for a supervised child and the clock (tests/unit/test_supervision.py,
test_runtime_status.py): a child whose death the test decides, and time it moves."""

from __future__ import annotations


class FakeChild:
    """A child whose death the test decides; `restart` may fail on demand."""

    def __init__(self, name: str = "superlink") -> None:
        self.name = name
        self.code: int | None = None
        self.restarts = 0
        self.fail_next_restarts = 0
        self.refused: str | None = None

    def exit_code(self) -> int | None:
        return self.code

    def restart(self) -> None:
        self.restarts += 1
        if self.fail_next_restarts:
            self.fail_next_restarts -= 1
            self.code = 1
            raise RuntimeError("port 9092 is held by pid 4242")
        self.code = None

    def log_tail(self) -> str:
        return "last line of its log"

    def refusal(self) -> str | None:
        return self.refused


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
