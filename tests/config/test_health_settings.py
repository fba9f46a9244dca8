"""Health, session-failure, retry-budget and active-check settings."""

from __future__ import annotations

import pytest

from core.models import HealthPolicy, StickyFailure
from tests.config.helpers import WriteFile, assert_message, config_error, load

POOL = '[[pools]]\nname = "default"\n'


def test_defaults() -> None:
    settings = load()
    assert settings.checks.enabled
    assert (settings.checks.interval, settings.checks.judge_url) == (300.0, None)
    assert (settings.gateway.retry_budget_percent, settings.gateway.retry_budget_min) == (20, 3)


def test_every_key_is_read(write: WriteFile) -> None:
    path = write(
        '[gateway]\nretry_budget_percent = 10\nretry_budget_min = 1\n'
        '[checks]\nenabled = false\ninterval = 60\ntimeout = 3\nconcurrency = 4\n'
        'judge_url = "http://127.0.0.1:9/judge"\nsite_reach = ["https://127.0.0.1:9/"]\n'
        + POOL
        + 'on_sticky_failure = "rebind_matching"\nfailures_to_eject = 3\nbase_ejection_s = 10\n'
        "max_ejection_s = 40\nmax_ejection_percent = 25\nsuccess_rate_ejection = true\n"
    )
    settings = load(path)
    pool = settings.pools[0].to_pool()
    assert pool.on_sticky_failure is StickyFailure.REBIND_MATCHING
    assert pool.health == HealthPolicy(
        failures_to_eject=3,
        base_ejection_s=10,
        max_ejection_s=40,
        max_ejection_percent=25,
        success_rate_ejection=True,
    )
    checks = settings.checks
    assert (checks.enabled, checks.interval, checks.timeout, checks.concurrency) == (
        False,
        60,
        3,
        4,
    )
    assert checks.judge_url == "http://127.0.0.1:9/judge"
    assert checks.site_reach == ("https://127.0.0.1:9/",)
    assert (settings.gateway.retry_budget_percent, settings.gateway.retry_budget_min) == (10, 1)


def test_environment_sets_pool_health_and_booleans() -> None:
    env = {
        "PROXYGATE_POOLS__DEFAULT__FAILURES_TO_EJECT": "2",
        "PROXYGATE_POOLS__DEFAULT__SUCCESS_RATE_EJECTION": "true",
        "PROXYGATE_CHECKS__ENABLED": "false",
    }
    settings = load(env=env)
    health = settings.pools[0].health
    assert (health.failures_to_eject, health.success_rate_ejection) == (2, True)
    assert settings.checks.enabled is False


@pytest.mark.parametrize(
    ("line", "key", "reason"),
    [
        ('on_sticky_failure = "retry"', "on_sticky_failure", "is not one of rebind"),
        ("failures_to_eject = 0", "failures_to_eject", "must be at least 1"),
        ("max_ejection_percent = 120", "max_ejection_percent", "from 0 to 100"),
        ("max_ejection_s = 5", "max_ejection_s", "at least base_ejection_s (30)"),
        ('success_rate_ejection = "yes"', "success_rate_ejection", "expected true or false"),
    ],
)
def test_bad_pool_health_settings(write: WriteFile, line: str, key: str, reason: str) -> None:
    path = write(POOL + line + "\n")
    assert_message(config_error(path), str(path), f"pools[0].{key}", reason)


def test_a_judge_must_be_an_http_url(write: WriteFile) -> None:
    path = write('[checks]\njudge_url = "ftp://127.0.0.1/"\n')
    assert_message(config_error(path), str(path), "checks.judge_url", "http:// or https://")
