"""A cache manifest.json that is not the expected JSON is a one-line error naming the file."""

from __future__ import annotations

import pytest

from tfpneumo.data.manifest import CacheError, read_cache_info, write_manifest


@pytest.mark.parametrize(("text", "problem"), [
    (b"{not json", "unreadable cache manifest"),
    (b"\xff\xfe{}", "unreadable cache manifest"),  # not UTF-8
    (b"[" * 100000 + b"]" * 100000, "unreadable cache manifest"),  # RecursionError
    (b"[64, 5]", "must be a JSON object, not a list"),
    (b'"size"', "must be a JSON object, not a string"),
    (b'{"folds": 5}', "key 'size' missing"),
    (b'{"size": 64}', "key 'folds' missing"),
    (b'{"size": "64", "folds": 5}', 'size must be a positive integer, not "64"'),
    (b'{"size": true, "folds": 5}', "size must be a positive integer, not true"),
    (b'{"size": 64, "folds": 2.5}', "folds must be a positive integer, not 2.5"),
    (b'{"size": 64, "folds": 0}', "folds must be a positive integer, not 0"),
    (b'{"size": 64, "folds": 5, "clahe": "no"}', 'clahe must be true or false, not "no"'),
    (b'{"size": 64, "folds": 5, "data_dir": ["a"]}', "data_dir must be a folder name"),
])
def test_malformed_manifest_is_one_line(tmp_path, text, problem):
    (tmp_path / "manifest.json").write_bytes(text)
    with pytest.raises(CacheError) as e:
        read_cache_info(tmp_path)
    message = str(e.value)
    assert "\n" not in message and len(message) < 300, message
    assert message.startswith(str(tmp_path / "manifest.json")) and problem in message, message


def test_written_manifest_reads_back(tmp_path):
    write_manifest(tmp_path, size=64, folds=5, clahe=True, data_dir="/data/siim")
    info = read_cache_info(tmp_path)
    assert (info.size, info.folds, info.clahe, str(info.data_dir)) == (64, 5, True, "/data/siim")


def test_find_cache_info_is_none_without_a_manifest_and_an_error_on_a_malformed_one(tmp_path):
    from tfpneumo.data.manifest import find_cache_info

    assert find_cache_info(tmp_path / "absent") is None
    assert find_cache_info(tmp_path) is None
    (tmp_path / "manifest.json").write_text('{"size": 64, "folds": 5, "clahe": "yes"}')
    with pytest.raises(CacheError, match=r"manifest\.json: clahe must be true or false"):
        find_cache_info(tmp_path)  # not a silent fallback to the config's prepare.clahe
