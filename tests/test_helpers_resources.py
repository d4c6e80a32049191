"""The skip policy of tests/helpers_resources.py: a missing engine, browser or data set fails a
test unless DEFECTFLOW_ALLOW_MISSING names its kind."""

import pytest
from helpers_resources import ALLOW_MISSING_ENV, skip_missing


def test_a_missing_resource_fails_the_test_by_default(monkeypatch):
    monkeypatch.delenv(ALLOW_MISSING_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception, match="missing container: no dockerd"):
        skip_missing("container", "no dockerd")


@pytest.mark.parametrize("allowed", ["container", "browser, container", "all"])
def test_an_allowed_kind_skips_with_the_reason(monkeypatch, allowed):
    monkeypatch.setenv(ALLOW_MISSING_ENV, allowed)
    with pytest.raises(pytest.skip.Exception, match="missing container: no dockerd"):
        skip_missing("container", "no dockerd")
    monkeypatch.setenv(ALLOW_MISSING_ENV, "browser")
    with pytest.raises(pytest.fail.Exception):
        skip_missing("real_data", "no ../shared")


def test_an_unknown_kind_in_the_setting_is_a_usage_error(monkeypatch):
    monkeypatch.setenv(ALLOW_MISSING_ENV, "containers")
    with pytest.raises(pytest.UsageError, match="unknown kind"):
        skip_missing("container", "no dockerd")
