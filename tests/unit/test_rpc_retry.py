"""call_with_retry: transient statuses retried with backoff, others translated at once."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from consortium import rpc
from consortium.errors import (
    ConflictError,
    ConsortiumError,
    InvalidArgumentError,
    NotFoundError,
    UnreachableError,
)
from consortium.rpc import RetryPolicy, call_with_retry, translate

ADDRESS = "10.1.2.3:50051"


class FakeRpcError(grpc.RpcError, grpc.Call):
    """What a failed unary call raises in grpc: an RpcError that is also a Call."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Any:
        return ()

    def trailing_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


class Script:
    """A fake RPC: raises the scripted errors in turn, then returns `value`."""

    def __init__(self, failures: list[BaseException], value: object = "ok") -> None:
        self.failures = list(failures)
        self.value = value
        self.timeouts: list[float] = []

    @property
    def calls(self) -> int:
        return len(self.timeouts)

    def __call__(self, timeout_s: float) -> object:
        self.timeouts.append(timeout_s)
        if self.failures:
            raise self.failures.pop(0)
        return self.value


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waited: list[float] = []
    monkeypatch.setattr(rpc.time, "sleep", waited.append)
    return waited


def unavailable(n: int) -> list[BaseException]:
    return [FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused") for _ in range(n)]


def test_call_with_retry_success_first_try_no_sleep(sleeps: list[float]) -> None:
    fn = Script([], value=42)
    assert call_with_retry(fn, ADDRESS) == 42
    assert fn.calls == 1
    assert sleeps == []


def test_call_with_retry_passes_rpc_timeout(sleeps: list[float]) -> None:
    fn = Script(unavailable(1))
    call_with_retry(fn, ADDRESS, RetryPolicy(attempts=3, rpc_timeout_s=2.5))
    assert fn.timeouts == [2.5, 2.5]


def test_call_with_retry_unavailable_every_time_retries_attempts_then_unreachable(
    sleeps: list[float],
) -> None:
    policy = RetryPolicy(attempts=5, initial_backoff_s=0.5, max_backoff_s=100.0)
    fn = Script(unavailable(10))
    with pytest.raises(UnreachableError) as excinfo:
        call_with_retry(fn, ADDRESS, policy)
    assert fn.calls == 5
    assert sleeps == [0.5, 1.0, 2.0, 4.0]  # no sleep after the last attempt
    message = str(excinfo.value)
    assert ADDRESS in message
    assert "5 attempts" in message
    assert "UNAVAILABLE" in message
    assert "connection refused" in message


def test_call_with_retry_backoff_capped_at_max(sleeps: list[float]) -> None:
    policy = RetryPolicy(attempts=7, initial_backoff_s=1.0, max_backoff_s=5.0)
    with pytest.raises(UnreachableError):
        call_with_retry(Script(unavailable(10)), ADDRESS, policy)
    assert sleeps == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_call_with_retry_default_policy_backoff_grows_exponentially(
    sleeps: list[float],
) -> None:
    fn = Script(unavailable(100))
    with pytest.raises(UnreachableError, match=ADDRESS):
        call_with_retry(fn, ADDRESS)
    assert fn.calls == rpc.DEFAULT_RETRY.attempts
    assert len(sleeps) == rpc.DEFAULT_RETRY.attempts - 1
    assert sleeps[0] == rpc.DEFAULT_RETRY.initial_backoff_s
    for earlier, later in itertools.pairwise(sleeps):
        assert later == min(earlier * 2, rpc.DEFAULT_RETRY.max_backoff_s)


def test_call_with_retry_deadline_exceeded_is_retried(sleeps: list[float]) -> None:
    fn = Script([FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "slow")], value="late")
    assert call_with_retry(fn, ADDRESS, RetryPolicy(attempts=3)) == "late"
    assert fn.calls == 2
    assert len(sleeps) == 1


def test_call_with_retry_success_on_third_attempt_returns_value(sleeps: list[float]) -> None:
    policy = RetryPolicy(attempts=6, initial_backoff_s=0.25, max_backoff_s=8.0)
    fn = Script(unavailable(2), value={"job_id": "abc"})
    assert call_with_retry(fn, ADDRESS, policy) == {"job_id": "abc"}
    assert fn.calls == 3
    assert sleeps == [0.25, 0.5]


def test_call_with_retry_on_retry_callback_gets_attempt_backoff_reason(
    sleeps: list[float],
) -> None:
    seen: list[tuple[int, float, str]] = []
    policy = RetryPolicy(attempts=4, initial_backoff_s=1.0)
    fn = Script(unavailable(2))
    call_with_retry(fn, ADDRESS, policy, on_retry=lambda *args: seen.append(args))
    assert seen == [
        (1, 1.0, "UNAVAILABLE: connection refused"),
        (2, 2.0, "UNAVAILABLE: connection refused"),
    ]
    assert sleeps == [1.0, 2.0]


def test_call_with_retry_invalid_argument_not_retried(sleeps: list[float]) -> None:
    fn = Script([FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "field 'rounds': > 0")])
    with pytest.raises(InvalidArgumentError, match="field 'rounds'"):
        call_with_retry(fn, ADDRESS, RetryPolicy(attempts=5))
    assert fn.calls == 1
    assert sleeps == []


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, ConflictError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
    ],
)
def test_call_with_retry_permanent_status_becomes_typed_error(
    sleeps: list[float], code: grpc.StatusCode, expected: type[ConsortiumError]
) -> None:
    fn = Script([FakeRpcError(code, "details here")])
    with pytest.raises(expected, match="details here"):
        call_with_retry(fn, ADDRESS)
    assert fn.calls == 1
    assert sleeps == []


def test_call_with_retry_unmapped_status_becomes_base_error(sleeps: list[float]) -> None:
    fn = Script([FakeRpcError(grpc.StatusCode.INTERNAL, "boom")])
    with pytest.raises(ConsortiumError, match="boom") as excinfo:
        call_with_retry(fn, ADDRESS)
    assert type(excinfo.value) is ConsortiumError
    assert fn.calls == 1


def test_call_with_retry_permanent_error_after_transient_stops(sleeps: list[float]) -> None:
    fn = Script([*unavailable(1), FakeRpcError(grpc.StatusCode.NOT_FOUND, "no job x")])
    with pytest.raises(NotFoundError, match="no job x"):
        call_with_retry(fn, ADDRESS, RetryPolicy(attempts=5))
    assert fn.calls == 2
    assert len(sleeps) == 1


def test_call_with_retry_rpc_error_without_call_not_retried(sleeps: list[float]) -> None:
    fn = Script([grpc.RpcError("bare")])
    with pytest.raises(ConsortiumError, match="bare"):
        call_with_retry(fn, ADDRESS, RetryPolicy(attempts=5))
    assert fn.calls == 1
    assert sleeps == []


def test_call_with_retry_non_grpc_exception_propagates(sleeps: list[float]) -> None:
    fn = Script([KeyError("not an rpc failure")])
    with pytest.raises(KeyError):
        call_with_retry(fn, ADDRESS)
    assert fn.calls == 1


def test_translate_transient_status_names_address() -> None:
    error = translate(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "refused"), ADDRESS)
    assert isinstance(error, UnreachableError)
    assert ADDRESS in str(error)


def test_translate_empty_details_uses_status_name() -> None:
    error = translate(FakeRpcError(grpc.StatusCode.NOT_FOUND, ""), ADDRESS)
    assert isinstance(error, NotFoundError)
    assert str(error) == "NOT_FOUND"
