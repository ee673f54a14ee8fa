"""Settings from the environment: a bad value falls back to the default and says so."""

import logging

from sgl_merge.envs import flag, seconds


def test_seconds_reads_the_variable_or_falls_back_to_the_default(monkeypatch, caplog):
    monkeypatch.delenv("SGLANG_MERGE_TEST_S", raising=False)
    assert seconds("SGLANG_MERGE_TEST_S", 30.0) == 30.0
    monkeypatch.setenv("SGLANG_MERGE_TEST_S", "2.5")
    assert seconds("SGLANG_MERGE_TEST_S", 30.0) == 2.5
    monkeypatch.setenv("SGLANG_MERGE_TEST_S", "ten")
    with caplog.at_level(logging.ERROR, logger="sgl_merge"):
        assert seconds("SGLANG_MERGE_TEST_S", 30.0) == 30.0
    assert "SGLANG_MERGE_TEST_S='ten' is not a number of seconds" in caplog.text


def test_flag_is_on_only_for_yes_values(monkeypatch):
    monkeypatch.delenv("SGLANG_MERGE_TEST_F", raising=False)
    assert not flag("SGLANG_MERGE_TEST_F")
    for value, on in (("1", True), ("true", True), ("YES", True), ("0", False), ("no", False), ("", False)):
        monkeypatch.setenv("SGLANG_MERGE_TEST_F", value)
        assert flag("SGLANG_MERGE_TEST_F") is on, value
