"""Settings from the environment: a bad value falls back to the default and says so."""

import logging

from sgl_merge.envs import seconds


def test_seconds_reads_the_variable_or_falls_back_to_the_default(monkeypatch, caplog):
    monkeypatch.delenv("SGLANG_MERGE_TEST_S", raising=False)
    assert seconds("SGLANG_MERGE_TEST_S", 30.0) == 30.0
    monkeypatch.setenv("SGLANG_MERGE_TEST_S", "2.5")
    assert seconds("SGLANG_MERGE_TEST_S", 30.0) == 2.5
    monkeypatch.setenv("SGLANG_MERGE_TEST_S", "ten")
    with caplog.at_level(logging.ERROR, logger="sgl_merge"):
        assert seconds("SGLANG_MERGE_TEST_S", 30.0) == 30.0
    assert "SGLANG_MERGE_TEST_S='ten' is not a number of seconds" in caplog.text
