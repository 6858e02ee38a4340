"""RPM/TPM sliding windows, driven by an explicit clock (no sleeping, no timing)."""

from __future__ import annotations

from serving.limits import RateLimiter


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rpm_refuses_the_extra_request_and_says_when_to_retry():
    clock = Clock()
    lim = RateLimiter(clock)
    assert all(lim.admit("k", 1, rpm=3, tpm=0) is None for _ in range(3))
    clock.t += 10
    r = lim.admit("k", 1, rpm=3, tpm=0)
    assert r is not None and r.code == "rate_limit_exceeded" and r.retry_after_s == 50
    assert lim.admit("other", 1, rpm=3, tpm=0) is None  # per key
    clock.t += 50
    assert lim.admit("k", 1, rpm=3, tpm=0) is None  # the window moved on


def test_tpm_counts_tokens_and_refuses_oversized_requests():
    clock = Clock()
    lim = RateLimiter(clock)
    assert lim.admit("k", 60, rpm=0, tpm=100) is None
    clock.t += 20
    assert lim.admit("k", 30, rpm=0, tpm=100) is None
    r = lim.admit("k", 20, rpm=0, tpm=100)
    assert r is not None and r.code == "token_rate_limit_exceeded" and r.retry_after_s == 40
    big = lim.admit("k2", 101, rpm=0, tpm=100)
    assert big is not None and big.code == "token_rate_limit_exceeded"
    clock.t += 40
    assert lim.admit("k", 20, rpm=0, tpm=100) is None


def test_refused_requests_do_not_consume_the_window():
    clock = Clock()
    lim = RateLimiter(clock)
    assert lim.admit("k", 1, rpm=1, tpm=0) is None
    for _ in range(5):
        assert lim.admit("k", 1, rpm=1, tpm=0) is not None
    clock.t += 60
    assert lim.admit("k", 1, rpm=1, tpm=0) is None


def test_no_limits_means_unlimited():
    lim = RateLimiter(Clock())
    assert all(lim.admit("k", 10 ** 6, rpm=0, tpm=0) is None for _ in range(1000))
