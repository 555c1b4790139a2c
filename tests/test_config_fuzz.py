"""Fuzzing the config: any --set string and any value of any key is a Config or one ConfigError.

Issue 11: a config error must never be a traceback (TypeError from a comparison, a
RecursionError, a repr that expands an alias bomb). Hypothesis builds ``--set`` strings from
the real keys and hostile values (wrong types, nested lists and maps, huge numbers, NaN, YAML
syntax, control characters), and whole YAML files; the only acceptable outcomes are a valid
Config or a ConfigError whose message is one bounded line.
"""

from __future__ import annotations

import dataclasses

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfpneumo.config import Config, ConfigError, load_config, read_yaml


def _keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING
                                    else f.default):
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            keys += _keys(type(sub), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


KEYS = _keys()
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
RAW = st.one_of(
    VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().replace("\n", " ")),
    st.text(max_size=40),  # YAML syntax of any kind, broken or not
    st.sampled_from(["[", "{a: ", "!!python/object:os.system ls", "&a [1] ", "*a", "1e999",
                     ".nan", "-.inf", "0x1F", "~", "'", "\x00", "a: b: c", "[[[[[[[[1]]]]]]]]"]))


def _outcome(run) -> None:
    try:
        assert isinstance(run(), Config)
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and len(message) < 600, message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=20)), raw=RAW)
def test_any_set_string_is_a_config_or_one_line(key, raw):
    _outcome(lambda: load_config(None, [f"{key}={raw}"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(item=st.text(max_size=60))
def test_any_text_after_set_is_a_config_or_one_line(item):
    _outcome(lambda: load_config(None, [item]))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5), text=st.text(max_size=80))
def test_any_config_file_is_a_config_or_one_line(tmp_path, doc, text):
    nested: dict = {}
    for dotted, value in doc.items():
        section, *rest = dotted.split(".")
        if rest:
            nested.setdefault(section, {})[rest[0]] = value
        else:
            nested[section] = value
    for i, body in enumerate((yaml.safe_dump(nested), text)):
        path = tmp_path / f"fuzz{i}.yaml"
        path.write_text(body, encoding="utf-8")
        _outcome(lambda p=path: load_config(p))
        try:
            read_yaml(path)
        except ConfigError as e:
            assert "\n" not in str(e)


def test_issue_11_config_values_that_were_accepted_or_tracebacks(tmp_path):
    # Issue 11 items 9 and 10: each is now one ConfigError naming the key or the file.
    cases = {
        "optimizer.lr=.inf": "optimizer.lr: expected a finite number",
        "augment.rotate=.inf": "augment.rotate: expected a finite number",
        "data.memory_budget_gb=.nan": "data.memory_budget_gb: expected a finite number",
        "optimizer.lr=" + "9" * 400: "optimizer.lr: expected a finite number",
        "experiment=.": "experiment: must be a plain folder name",
        'experiment="a\\0b"': "experiment: must be a plain folder name",  # YAML's escaped NUL
        "experiment=a b": "experiment: must be a plain folder name",
        "seed=-1": "seed: must be in [0, 2**32)",
        "seed=12345678901234567890": "seed: 12345678901234567890 is out of range",
        "data.batch_size=100000000000": "data.batch_size: 100000000000 is out of range",
        "data.batch_size=100000": "data.batch_size: must be in [1, 65536]",
        "data.batch_size=1e11": "data.batch_size: expected an integer",
        "train.top_k={a: 1, a: 2}": "key 'a' appears twice",
    }
    for item, needle in cases.items():
        try:
            load_config(None, [item])
        except ConfigError as e:
            assert needle in str(e) and "\n" not in str(e), (item, str(e))
        else:
            raise AssertionError(f"{item!r} was accepted")
    assert load_config(None, ["experiment=demo-faint-s0", "seed=4294967295"]).seed == 2**32 - 1

    duplicated = tmp_path / "dup.yaml"
    duplicated.write_text("optimizer:\n  lr: 0.1\ndata:\n  batch_size: 4\noptimizer:\n  lr: 0.2\n")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("experiment: r\xe9sum\xe9\n".encode("latin-1"))
    for path, needle in ((duplicated, "line 5: key 'optimizer' appears twice"),
                         (latin1, "not UTF-8 text (byte 13)")):
        try:
            load_config(path)
        except ConfigError as e:
            assert str(e).startswith(f"{path}: {needle}") and "\n" not in str(e), str(e)
        else:
            raise AssertionError(f"{path} was accepted")
