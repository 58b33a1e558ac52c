"""The host config: strict TOML, every refusal names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from iopart.config import Config, load, parse
from iopart.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"hosts": {}}, "hosts: unknown section"),
        ({"host": {"cpu": 2}}, "host.cpu: unknown key"),
        ({"host": {"cpus": "2"}}, "host.cpus must be a number"),
        ({"host": {"cpus": True}}, "host.cpus must be a number"),
        ({"host": {"memory_mib": 1.5}}, "host.memory_mib must be an integer"),
        ({"host": {"memory_mib": 1}}, "host.memory_mib = 1 is out of range"),
        ({"policy": {"default_cpu": 2.0}}, "policy.default_cpu exceeds"),
        ({"partition": {"name": "a"}}, "partition must be an array of tables"),
        ({"partition": [{"cpu": 0.1}]}, "partition[0].name is required"),
        ({"partition": [{"name": "Web"}]}, "partition[0].name must be a name"),
        ({"partition": [{"name": "a"}, {"name": "a"}]}, "partition[1].name: 'a' is defined twice"),
        ({"partition": [{"name": "a", "memory_mib": 9999}]}, "exceeds policy.max_partition_memory"),
        ({"partition": [{"name": "a", "colour": "red"}]}, "partition[0].colour: unknown key"),
    ],
)
def test_bad_config_is_refused_naming_the_key(raw: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert names in e.value.message


def test_good_config_and_defaults(tmp_path: Path) -> None:
    assert load(None) == Config()
    f = tmp_path / "host.toml"
    f.write_text('[host]\ncpus = 2\n\n[[partition]]\nname = "web"\ncpu = 0.25\n')
    cfg = load(f)
    assert cfg.host.cpus == 2.0 and cfg.partitions[0].name == "web"
    assert cfg.partitions[0].memory_mib == 16  # default filled in
    f.write_text("[host\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(f)
    with pytest.raises(ConfigError, match="no such config file"):
        load(tmp_path / "missing.toml")
