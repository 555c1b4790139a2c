"""Config: defaults == configs/base.yaml, overrides, validation naming the key, round trip."""

from pathlib import Path

import pytest
import yaml

from tfpneumo.config import Config, ConfigError, dump_config, load_config, read_yaml, replace, to_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_base_yaml_documents_every_default():
    assert read_yaml(CONFIGS / "base.yaml") == to_dict(Config())
    for line in (CONFIGS / "base.yaml").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"undocumented key in base.yaml: {line!r}"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_overrides_file_then_set(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("experiment: exp1\ndata:\n  batch_size: 4\n  image_size: 256\n")
    cfg = load_config(exp, ["data.batch_size=2", "optimizer.lr=1e-3", "model.encoder_weights=none"])
    assert cfg.experiment == "exp1"
    assert cfg.data.image_size == 256 and cfg.data.batch_size == 2
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.model.encoder_weights == "none"
    assert cfg.augment == Config().augment  # untouched sections keep their defaults


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.bogus=1", "data.bogus"),
        ("bogus.key=1", "bogus"),
        ("data.batch_size=x", "data.batch_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.image_size=100", "data.image_size"),
        ("data.crop=zoom", "data.crop"),
        ("augment.hflip=1.5", "augment.hflip"),
        ("loss.mask=l2", "loss.mask"),
        ("train.epochs=true", "train.epochs"),
        ("train.val_thresholds=[0.5, 2]", "train.val_thresholds"),
        ("train.stages=[{name: a, set: {data.nope: 1}}]", "train.stages.a.data.nope"),
        ("experiment=../x", "experiment"),
        ("data.service=local:0", "data.service"),
        ("data.service=http://host:5050", "data.service"),
        ("data.service=host", "data.service"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"config key {key.replace('.', '[.]')}"):
        load_config(None, [override])


@pytest.mark.parametrize("spec", ["local", "local:3", "grpc://hostA:5050", "10.0.0.2:5050"])
def test_data_service_specs(spec):
    assert load_config(None, [f"data.service={spec}"]).data.service == spec


def test_yaml_with_python_tags_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(None, ["data.batch_size=3", "train.stages=[{name: s1, set: {train.epochs: 2}}]"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["batch_size"] == 3


def test_stages_override_the_base_config():
    cfg = load_config(None, [
        "train.stages=[{name: s512, set: {data.image_size: 512, train.freeze_encoder_epochs: 1}},"
        " {name: s1024, set: {data.image_size: 1024, data.batch_size: 2}}]"])
    (n1, c1), (n2, c2) = cfg.stage_configs()
    assert (n1, c1.data.image_size, c1.train.freeze_encoder_epochs) == ("s512", 512, 1)
    assert (n2, c2.data.image_size, c2.data.batch_size) == ("s1024", 1024, 2)
    assert load_config().stage_configs()[0][0] == "main"


def _laughs(levels: int = 9) -> str:
    """"Billion laughs": 9 levels of 9 aliases each, 9**9 (387 million) items once expanded."""
    names = "abcdefghijklmnop"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip(names[:levels - 1], names[1:levels], strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + f"\nexperiment: *{names[levels - 1]}\n"


def test_yaml_aliases_are_refused_in_files_and_set_values(tmp_path):
    # Issue 11: safe_load builds the bomb compactly (shared lists), but formatting it into the
    # validation error expanded it: out of memory. Aliases are refused before anything is built.
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_laughs())
    assert len(bomb.read_bytes()) < 500
    for call in (lambda: read_yaml(bomb), lambda: load_config(bomb)):
        with pytest.raises(ConfigError) as e:
            call()
        assert str(e.value).startswith(f"{bomb}: line 2: YAML aliases") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^--set 'data.cache=\[&a \[x, x\], \*a\]': line 1: YAML aliases"):
        load_config(None, ["data.cache=[&a [x, x], *a]"])
    plain = tmp_path / "anchor-only.yaml"  # an anchor that is never used is harmless
    plain.write_text("data: &d {batch_size: 3}\n")
    assert load_config(plain).data.batch_size == 3


def test_values_in_error_messages_are_bounded():
    # Without aliases a value is as large as its file, but a message quotes at most 80 chars,
    # and formatting never builds the whole repr (here 9**7 items through shared lists).
    bomb: list = ["x"] * 9
    for _ in range(6):
        bomb = [bomb] * 9
    for sections in ({"data": {"cache": bomb}}, {"data": {"batch_size": "9" * 10**6}},
                     {"experiment": {"k" * 10**6: 1}}, {"data": {"k" * 10**6: 1}}):
        with pytest.raises(ConfigError) as e:
            replace(Config(), **sections)
        assert len(str(e.value)) < 400 and "\n" not in str(e.value), str(e.value)[:1000]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["x" * 10**6])
    assert len(str(e.value)) < 200
