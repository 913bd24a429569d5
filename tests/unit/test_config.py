"""The configuration layer (agent.config): the example files load, and every bad file is refused
with `FILE:LINE:COL: path: message` problems that point at the offending key or value."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from harness import as_another_user

from agent.config import (
    FILE_PATH,
    Config,
    ConfigError,
    Problem,
    check_files,
    load_config,
    parse_config,
)
from agent.configschema import json_schema
from agent.envsubst import SubstitutionError, substitute

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [REPO / "config" / "example.yaml", *sorted((REPO / "config" / "examples").glob("*.yaml"))]
FIXTURES = Path(__file__).resolve().parent / "configs"
EXAMPLE_ENV = {"HJ212_PW": "123456", "MQTT_USER": "station", "MQTT_PASS": "pass-word"}

# A valid station; tests replace parts of it. Line numbers below refer to this text.
GOOD = """\
station:
  id: ST01
  type: other
storage:
  path: ./data/buffer.db
mqtt:
  url: mqtt://127.0.0.1:1883
buses:
  rs485-1: {type: rtu, port: /dev/ttyUSB0}
devices:
  sim:
    driver: simulated
    interval: 1
    channels:
      a34004: {unit: ug/m3, mean: 45}
  cod:
    bus: rs485-1
    slave: 1
    profile: cod-analyzer
"""


def write(tmp_path: Path, text: str, name: str = "station.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def port_here(tmp_path: Path, text: str) -> str:
    """`text` with GOOD's serial port replaced by a file that exists, so that check-config has nothing to
    say about the port, whether or not this machine has a /dev/ttyUSB0."""
    (tmp_path / "ttyUSB0").touch()
    return text.replace("port: /dev/ttyUSB0", f"port: {tmp_path / 'ttyUSB0'}")


def problems_of(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return [str(p) for p in info.value.problems]


def single_problem(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = write(tmp_path, text)
    found = problems_of(path, env)
    assert len(found) == 1, found
    prefix = f"{path}:"
    assert found[0].startswith(prefix)
    return found[0][len(prefix):]


def with_zone(tmp_path: Path, zone: str) -> str:
    return port_here(tmp_path, GOOD.replace("  type: other\n", f"  type: other\n  timezone: {zone}\n"))


@pytest.mark.parametrize("zone, says", [
    ("localtime", "'localtime' is whatever zone this machine is set to"),
    ("posixrules", "'posixrules' is the system's default rule file"),
    ("Factory", "'Factory' is the placeholder zone"),
    ("posix/Asia/Shanghai", "write 'Asia/Shanghai'"),
    ("right/Asia/Shanghai", "write 'Asia/Shanghai'"),
    ("Asia/Beijing", "unknown time zone 'Asia/Beijing'"),
])
def test_a_station_timezone_must_name_a_zone(tmp_path, zone, says):
    """Zone files that ZoneInfo opens but that name no station's zone (audit U): `localtime` follows the
    machine (a technician's laptop and the gateway differ), `right/` zones count leap seconds."""
    problem = single_problem(tmp_path, with_zone(tmp_path, zone))
    assert problem.startswith("4:13: station.timezone: ") and says in problem, problem


def test_backward_zone_names_stay_valid(tmp_path):
    for zone in ("PRC", "Etc/GMT-8", "UTC", "Asia/Kathmandu"):
        path = write(tmp_path, with_zone(tmp_path, zone))
        assert load_config(path, env={}).station.timezone == zone


# --------------------------------------------------------------------------------------------------
# Good files


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    config = load_config(path, env=EXAMPLE_ENV)
    assert config.source_path == path.resolve()
    assert config.devices
    assert all(dev.driver is not None for dev in config.devices.values())


def test_demo_example_runs_without_hardware() -> None:
    config = load_config(REPO / "config" / "example.yaml", env={})
    assert config.station.id == "DEMO0000000001"
    assert {dev.driver for dev in config.devices.values()} == {"simulated"}
    assert not config.buses
    assert config.mqtt.broker_urls() == ["mqtt://127.0.0.1:1883"]
    assert config.storage.path == REPO / "config" / "demo-data" / "buffer.db"
    assert all(1 <= dev.interval <= 5 for dev in config.devices.values())
    assert config.alarms


def test_good_config_has_defaults_and_helpers(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    assert config.storage.max_mb == 256 and config.storage.keep_sent_days == 7
    assert config.storage.commit_interval_ms == 200 and config.storage.sync == "full"
    assert config.mqtt.qos == 1 and config.mqtt.payload == "json" and config.mqtt.max_batch == 200
    assert config.mqtt.reconnect_max == 30 and config.mqtt.shutdown_grace == 5 and config.mqtt.keepalive == 30
    assert config.client_id() == "ST01"
    assert config.topic_base() == "env/ST01"
    assert config.station.timezone == "Asia/Shanghai"
    assert config.aggregate.minute == 10 and config.aggregate.hour and config.aggregate.day
    bus = config.buses["rs485-1"]
    assert (bus.type, bus.baudrate, bus.parity, bus.bytesize, bus.stopbits, bus.timeout, bus.retries) == (
        "rtu", 9600, "N", 8, 1, 0.5, 1)
    assert config.devices["cod"].driver == "modbus"  # default on an rtu bus
    assert config.devices["cod"].interval == 60
    assert config.devices["cod"].known_channels() == ["w01018"]
    assert config.devices["sim"].known_channels() == ["a34004"]
    assert config.bus_of("cod") is bus and config.bus_of("sim") is None
    broker = config.mqtt.brokers()[0]
    assert (broker.host, broker.port, broker.tls) == ("127.0.0.1", 1883, False)


def test_the_readme_states_the_defaults_an_omitted_key_takes(tmp_path: Path) -> None:
    """SPEC's example sets these keys without saying what leaving one out gives; a technician who
    deletes a line (a device's `interval`, the `timezone`) must find the value in the README. It said
    none of them (a device without `interval` is polled once a minute)."""
    text = GOOD.replace("  rs485-1: {type: rtu, port: /dev/ttyUSB0}\n",
                        "  rs485-1: {type: rtu, port: /dev/ttyUSB0}\n  lan: {type: tcp, host: 127.0.0.1}\n"
                        "  uart: {type: serial, port: /dev/ttyAMA0}\n")
    text += "  pm: {bus: uart, driver: pms5003}\nhj212: {st: 32, pw: '123456', uplinks: [{host: h, port: 9000}]}\n"
    config = load_config(write(tmp_path, text), env={})
    rtu, tcp, serial = config.buses["rs485-1"], config.buses["lan"], config.buses["uart"]
    uplink = config.hj212.uplinks[0]
    stated = {
        "`station.timezone` Asia/Shanghai": config.station.timezone == "Asia/Shanghai",
        "`storage.max_mb` 256": config.storage.max_mb == 256,
        "`keep_sent_days` 7": config.storage.keep_sent_days == 7,
        "`commit_interval_ms` 200": config.storage.commit_interval_ms == 200,
        "`mqtt.topic_prefix` env": config.mqtt.topic_prefix == "env",
        "`max_batch` 200": config.mqtt.max_batch == 200,
        "`reconnect_max` 30": config.mqtt.reconnect_max == 30,
        "a device's `interval` 60 s": config.devices["cod"].interval == 60,
        "buses 9600 baud 8N1": all((b.baudrate, b.bytesize, b.parity, b.stopbits) == (9600, 8, "N", 1)
                                   for b in (rtu, serial)),
        "`timeout` 0.5 s on rtu buses and 1 s on tcp and serial ones": (rtu.timeout, tcp.timeout,
                                                                         serial.timeout) == (0.5, 1, 1),
        "tcp `port` 502": tcp.port == 502,
        "uplinks' `timeout` 10 s and `retries` 3": (uplink.timeout, uplink.retries) == (10, 3),
    }
    readme = " ".join((REPO / "README.md").read_text().split())
    assert all(stated.values()), stated
    assert [phrase for phrase in stated if phrase not in readme] == []


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path, monkeypatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", """\
  url: mqtts://broker.example
  username: station
  password_file: secrets/mqtt.pass
  tls: {ca: ca.pem, cert: /abs/client.pem, key: ../keys/client.key}""").replace(
        "  rs485-1: {type: rtu, port: /dev/ttyUSB0}", "  rs485-1: {type: rtu, port: /dev/serial/../ttyUSB0}")
    path = write(conf_dir, text)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    config = load_config(Path("etc") / "station.yaml", env={})
    assert config.storage.path == conf_dir / "data" / "buffer.db"
    assert config.mqtt.password_file == conf_dir / "secrets" / "mqtt.pass"
    assert config.mqtt.tls is not None
    assert config.mqtt.tls.ca == conf_dir / "ca.pem"
    assert config.mqtt.tls.cert == Path("/abs/client.pem")
    assert config.mqtt.tls.key == tmp_path / "keys" / "client.key"
    assert config.buses["rs485-1"].port == "/dev/serial/../ttyUSB0"  # a port is not a file path: left alone
    assert config.source_path == path
    assert config.mqtt.brokers()[0].port == 8883


def test_env_substitution_anywhere_in_strings_with_escape(tmp_path: Path) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", """\
  url: "mqtt://${BROKER_HOST}:${BROKER_PORT}"
  username: "${SITE}-${USER_SUFFIX}"
  password: ${MQTT_PASS}
  topic_prefix: "env$${literal}"
  max_batch: ${BATCH}""")
    env = {"BROKER_HOST": "10.0.0.7", "BROKER_PORT": "1884", "SITE": "fenhe", "USER_SUFFIX": "17",
           "MQTT_PASS": "Pa55-w0rd", "BATCH": "50"}
    config = load_config(write(tmp_path, text), env=env)
    assert config.mqtt.url == "mqtt://10.0.0.7:1884"
    assert config.mqtt.username == "fenhe-17"
    assert config.mqtt.read_password() == "Pa55-w0rd"
    assert config.mqtt.topic_prefix == "env${literal}"
    assert config.mqtt.max_batch == 50  # a plain ${VAR} that holds a number is a number
    assert "Pa55-w0rd" not in repr(config)  # a config may be logged: the password is not in its repr


def test_numbers_written_where_text_is_expected_keep_their_spelling(tmp_path: Path) -> None:
    text = GOOD.replace("id: ST01", "id: 0012").replace("rs485-1", "1")
    text += "hj212: {st: 32, pw: 012345, version: 2017}\n"
    config = load_config(write(tmp_path, text), env={})
    assert config.station.id == "0012"  # not 10 (YAML 1.1 octal) nor 12
    assert config.devices["cod"].bus == "1"
    assert config.hj212 is not None and config.hj212.pw == "012345" and config.hj212.version == "2017"


def test_a_number_with_leading_zeros_is_decimal_not_yaml_1_1_octal(tmp_path: Path) -> None:
    """`address: 0100` copied from a manual's table is register 100: YAML 1.1 (PyYAML) reads it as
    octal 64, and the agent read the wrong register without a word ("0100" in quotes, or 089, gave 100)."""
    text = GOOD.replace("slave: 1", "slave: 010").replace("interval: 1", "interval: ${EVERY}")
    text += "    registers:\n      - {channel: extra, address: 0100, type: uint16}\n"
    config = load_config(write(tmp_path, text), env={"EVERY": "010"})
    specs = {s.channel: s for s in config.devices["cod"].register_map() or []}
    assert specs["extra"].address == 100
    assert config.devices["cod"].slave == 10
    assert config.devices["sim"].interval == 10  # substituted into a plain scalar: the same number
    problems = problems_of(write(tmp_path, text.replace("address: 0100", "address: -0_17")), env={"EVERY": "1"})
    assert any("-17 is outside" in p for p in problems), problems


def test_profile_entries_can_be_overridden_inline(tmp_path: Path) -> None:
    text = GOOD + "    registers:\n      - {channel: w01018, range: [0, 500]}\n" \
                  "      - {channel: extra, address: 0x50, type: uint16}\n"
    config = load_config(write(tmp_path, text), env={})
    specs = {s.channel: s for s in config.devices["cod"].register_map() or []}
    assert specs["w01018"].range == (0, 500)
    assert specs["w01018"].type == "float32" and specs["w01018"].order == "DCBA"  # from the profile
    assert specs["extra"].address == 0x50
    assert config.devices["cod"].known_channels() == ["w01018", "extra"]


def test_yaml_merge_keys_share_bus_settings(tmp_path: Path) -> None:
    text = GOOD.replace("  rs485-1: {type: rtu, port: /dev/ttyUSB0}", """\
  rs485-1: &line {type: rtu, port: /dev/ttyUSB0, baudrate: 19200, parity: e}
  rs485-2: {<<: *line, port: /dev/ttyUSB1}""")
    config = load_config(write(tmp_path, text), env={})
    bus2 = config.buses["rs485-2"]
    assert (bus2.port, bus2.baudrate, bus2.parity) == ("/dev/ttyUSB1", 19200, "E")


def test_programmatic_config_is_cross_checked_too() -> None:
    data = {
        "station": {"id": "ST01", "type": "other"},
        "storage": {"path": "/tmp/x.db"},
        "mqtt": {"url": "mqtt://localhost"},
        "devices": {"sim": {"driver": "simulated", "channels": {"c1": {}}}},
        "alarms": [{"channel": "sim.c2", "above": 1}],
    }
    with pytest.raises(ValueError, match=r"alarms\.0\.channel: device 'sim' has no channel 'c2'"):
        Config.model_validate(data)
    data["alarms"] = [{"channel": "sim.c1", "above": 1}, {"channel": "nope.c1", "above": 1}]  # a warning only
    assert Config.model_validate(data).devices["sim"].driver == "simulated"


def test_json_schema_is_json_and_names_the_sections() -> None:
    schema = json.loads(json.dumps(json_schema()))
    assert set(schema["properties"]) == {"station", "storage", "mqtt", "buses", "devices", "aggregate",
                                         "hj212", "alarms", "console"}
    assert set(schema["required"]) >= {"station", "storage", "mqtt", "devices"}
    assert schema["additionalProperties"] is False


def test_problem_format() -> None:
    problem = Problem("a.yaml", 3, 5, "devices.cod.interval", "must be at least 0.1 seconds")
    assert str(problem) == "a.yaml:3:5: devices.cod.interval: must be at least 0.1 seconds"


# --------------------------------------------------------------------------------------------------
# Bad files: each refused with the exact location


def test_typo_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    text = GOOD.replace("    interval: 1", "    intervall: 1")
    assert single_problem(tmp_path, text) == (
        "13:5: devices.sim.intervall: unknown key 'intervall' (did you mean 'interval'?)")


def test_a_key_of_another_type_of_bus_says_so_rather_than_suggest_a_lookalike(tmp_path: Path) -> None:
    # `parity` on a tcp bus is not a typo of `port`: the technician left serial settings on a gateway
    text = GOOD.replace("  rs485-1: {type: rtu, port: /dev/ttyUSB0}",
                        "  rs485-1: {type: tcp, host: 10.0.0.5, parity: E}")
    assert single_problem(tmp_path, text) == (
        "9:40: buses.rs485-1.parity: unknown key 'parity': a key of rtu and serial buses, not of a tcp bus")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert single_problem(tmp_path, GOOD + "log_level: debug\n").startswith("20:1: log_level: unknown key")


def test_wrong_type(tmp_path: Path) -> None:
    text = GOOD.replace("    slave: 1", "    slave: one")
    assert single_problem(tmp_path, text) == "18:12: devices.cod.slave: expected a whole number (got 'one')"


def test_missing_env_var_points_at_the_value(tmp_path: Path) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", "  url: mqtt://${BROKER}:1883")
    assert single_problem(tmp_path, text) == "7:8: mqtt.url: environment variable BROKER is not set"


def test_a_lone_surrogate_is_refused_where_it_is_written_or_substituted(tmp_path: Path) -> None:
    """JSON-style escapes in YAML can write half a UTF-16 pair, and an environment variable whose bytes
    are not UTF-8 comes to Python as such halves: in a unit, every write of the buffer failed."""
    text = GOOD.replace("{unit: ug/m3, mean: 45}", '{unit: "ug\\ud800", mean: 45}')
    assert single_problem(tmp_path, text) == (
        "15:22: devices.sim.channels.a34004.unit: contains a lone surrogate ('\\ud800'), which is no character "
        "and cannot be stored or sent: write the character itself")
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883",
                        "  url: mqtt://127.0.0.1:1883\n  username: u\n  password: ${PASS}")
    assert single_problem(tmp_path, text, env={"PASS": "se\udcffcret"}) == (
        "9:13: mqtt.password: contains a lone surrogate, which is no character and cannot be stored or sent: "
        "write the character itself")


def test_bad_url_scheme(tmp_path: Path) -> None:
    text = GOOD.replace("mqtt://127.0.0.1:1883", "http://127.0.0.1:1883")
    assert single_problem(tmp_path, text) == "7:8: mqtt.url: unsupported scheme 'http://': use mqtt:// or mqtts://"


def test_url_without_host(tmp_path: Path) -> None:
    text = GOOD.replace("mqtt://127.0.0.1:1883", "mqtt://:1883")
    assert single_problem(tmp_path, text).startswith("7:8: mqtt.url: the url names no host")


def test_duplicate_device_id(tmp_path: Path) -> None:
    text = GOOD + "  sim:\n    driver: simulated\n    channels: {x: {}}\n"
    assert single_problem(tmp_path, text) == "20:3: devices.sim: duplicate key 'sim' (first defined at line 11)"


def test_negative_interval(tmp_path: Path) -> None:
    text = GOOD.replace("    interval: 1", "    interval: -5")
    assert single_problem(tmp_path, text) == "13:15: devices.sim.interval: must be at least 0.1 seconds (got -5)"


def test_interval_below_a_tenth_of_a_second(tmp_path: Path) -> None:
    text = GOOD.replace("    interval: 1", "    interval: 0.05")
    assert single_problem(tmp_path, text) == "13:15: devices.sim.interval: must be at least 0.1 seconds (got 0.05)"


def test_unknown_bus(tmp_path: Path) -> None:
    text = GOOD.replace("    bus: rs485-1", "    bus: rs485-2")
    assert single_problem(tmp_path, text) == (
        "17:10: devices.cod.bus: unknown bus 'rs485-2' (did you mean 'rs485-1'?); buses: rs485-1")


def test_unknown_profile(tmp_path: Path) -> None:
    text = GOOD.replace("profile: cod-analyzer", "profile: cod-analyser")
    assert single_problem(tmp_path, text).startswith(
        "19:14: devices.cod.profile: unknown profile 'cod-analyser' (did you mean 'cod-analyzer'?)")


def test_bad_station_id(tmp_path: Path) -> None:
    text = GOOD.replace("id: ST01", 'id: "ST 01/2"')
    assert single_problem(tmp_path, text) == (
        "2:7: station.id: station id 'ST 01/2' must be 1 to 24 characters of A-Z, a-z, 0-9, '_' or '-'")


def test_url_and_urls_both(tmp_path: Path) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", "  url: mqtt://a\n  urls: [mqtt://b]")
    assert single_problem(tmp_path, text) == "8:3: mqtt.urls: give either url or urls, not both"


def test_url_or_urls_required(tmp_path: Path) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", "  qos: 0")
    assert single_problem(tmp_path, text).startswith("6:1: mqtt.url: missing required key 'url'")


def test_alarm_on_unknown_device_is_a_warning(tmp_path: Path) -> None:
    text = GOOD + "alarms:\n  - {channel: cox.w01018, above: 50}\n"
    path = write(tmp_path, text)
    config = load_config(path, env={})
    assert [str(w) for w in config.warnings] == [
        f"{path}:21:15: alarms.0.channel: warning: unknown device 'cox' (did you mean 'cod'?): the rule does "
        "nothing; devices: cod, sim"]


def test_alarm_on_a_channel_the_device_does_not_have(tmp_path: Path) -> None:
    text = GOOD + "alarms:\n  - {channel: sim.a34002, above: 50}\n  - {channel: cod.w01019, above: 50}\n"
    found = problems_of(write(tmp_path, text))
    assert [p.split(":", 1)[1] for p in found] == [
        "21:15: alarms.0.channel: device 'sim' has no channel 'a34002' (did you mean 'a34004'?); channels: a34004",
        "22:15: alarms.1.channel: device 'cod' has no channel 'w01019' (did you mean 'w01018'?); channels: w01018",
    ]


def test_alarm_rule_needs_a_condition(tmp_path: Path) -> None:
    text = GOOD + "alarms:\n  - channel: sim.a34004\n    hysteresis: 1\n"
    assert single_problem(tmp_path, text) == (
        "21:5: alarms.0: a rule needs at least one of above, below, preset, stale or fault")


def test_unknown_preset(tmp_path: Path) -> None:
    text = GOOD + "alarms:\n  - {channel: sim.a34004, preset: gb3095-2012-2}\n"
    assert single_problem(tmp_path, text).startswith("21:35: alarms.0.preset: unknown preset 'gb3095-2012-2'")


def test_yaml_syntax_error(tmp_path: Path) -> None:
    text = GOOD.replace("  rs485-1: {type: rtu, port: /dev/ttyUSB0}", "  rs485-1: {type: rtu, port: /dev/ttyUSB0")
    assert single_problem(tmp_path, text).startswith(f"10:8: {FILE_PATH}: YAML syntax error: ")


@pytest.mark.parametrize("written", ["{channel: sim.a34004, above: ${LIMIT}}", "[${LIMIT}]"])
def test_an_unquoted_substitution_inside_braces_or_brackets_is_explained(tmp_path: Path, written: str) -> None:
    """SPEC's own example writes buses, registers and uplinks in `{...}`, where YAML takes the `{` of
    `${NAME}` for the start of a mapping: the bare "expected ',' or '}', but got '{'" left the
    technician without a clue."""
    found = single_problem(tmp_path, GOOD + f"alarms:\n  - {written}\n", env={"LIMIT": "5"})
    column = 5 + written.index("${") + 1
    assert found.startswith(f"21:{column}: {FILE_PATH}: YAML syntax error: "), found
    assert found.endswith("; inside {...} or [...], put a ${NAME} in quotes: \"${NAME}\""), found


def test_tab_indentation_is_explained(tmp_path: Path) -> None:
    text = GOOD.replace("    interval: 1", "\tinterval: 1")
    assert "use spaces" in single_problem(tmp_path, text)


def test_a_tab_after_a_key_is_not_called_indentation(tmp_path: Path) -> None:
    """`interval:<TAB>1` (values lined up with a tab): PyYAML refuses a tab there too, and the hint said
    "YAML does not allow tabs for indentation", about a line whose indentation is spaces."""
    problem = single_problem(tmp_path, GOOD.replace("    interval: 1", "    interval:\t1"))
    assert problem.startswith("13:14: (file): YAML syntax error: ") and problem.endswith(
        "; a tab cannot separate a key from its value here: use a space"), problem


@pytest.mark.parametrize("indent", ["      interval: 1", "   interval: 1"])
def test_a_key_indented_wrongly_is_explained_at_its_line(tmp_path: Path, indent: str) -> None:
    text = GOOD.replace("    interval: 1", indent)
    line = text.splitlines().index(indent) + 1
    problem = single_problem(tmp_path, text)
    assert problem.startswith(f"{line}:"), problem
    assert "check the indentation of this line" in problem

def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert problems_of(path) == [f"{path}:1:1: {FILE_PATH}: cannot read the file: No such file or directory"]


def test_a_config_file_this_user_may_not_read_says_how_to_run_the_command(tmp_path):
    # An installed gateway's config is root:edge-agent 0640: a technician's own user gets a hint.
    path = tmp_path / "station.yaml"
    path.write_text("station: {id: ST01}\n")
    path.chmod(0)  # unreadable to its owner too (unless root: then the test acts as nobody)
    with as_another_user():
        said = problems_of(path)
    assert said == [f"{path}:1:1: {FILE_PATH}: cannot read the file: Permission denied (run the command as a user who "
                    "may read it; on a gateway: sudo -u edge-agent edge-agent ...)"]


def test_empty_file(tmp_path: Path) -> None:
    assert single_problem(tmp_path, "# only a comment\n").startswith(f"1:1: {FILE_PATH}: the file is empty")


def test_not_a_mapping(tmp_path: Path) -> None:
    assert single_problem(tmp_path, "- station\n").startswith(f"1:1: {FILE_PATH}: expected a mapping")


def test_password_and_password_file_both(tmp_path: Path) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", """\
  url: mqtt://127.0.0.1:1883
  username: station
  password: x
  password_file: /etc/edge-agent/mqtt.pass""")
    assert single_problem(tmp_path, text) == (
        "10:3: mqtt.password_file: give either password or password_file, not both")


def test_payload_hj212_needs_hj212_section(tmp_path: Path) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", "  url: mqtt://127.0.0.1:1883\n  payload: hj212")
    assert single_problem(tmp_path, text) == "8:12: mqtt.payload: payload: hj212 needs an hj212: section (st, pw)"


def test_tls_cert_without_key(tmp_path: Path) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", "  url: mqtts://127.0.0.1\n  tls:\n    cert: client.pem")
    assert single_problem(tmp_path, text) == (
        "9:5: mqtt.tls.cert: cert needs key too (the client certificate's private key)")


def test_missing_required_key_points_at_the_parent(tmp_path: Path) -> None:
    text = GOOD.replace("  type: other\n", "")
    assert single_problem(tmp_path, text) == "1:1: station.type: missing required key 'type'"


def test_missing_section(tmp_path: Path) -> None:
    text = GOOD.replace("storage:\n  path: ./data/buffer.db\n", "")
    assert single_problem(tmp_path, text) == "1:1: storage: missing required key 'storage'"


def test_modbus_device_needs_slave(tmp_path: Path) -> None:
    text = GOOD.replace("    slave: 1\n", "")
    assert single_problem(tmp_path, text) == (
        "16:3: devices.cod.slave: missing required key 'slave' (the Modbus unit id)")


def test_serial_bus_device_needs_a_frame_driver(tmp_path: Path) -> None:
    text = GOOD.replace("{type: rtu, port: /dev/ttyUSB0}", "{type: serial, port: /dev/ttyUSB0}")
    assert single_problem(tmp_path, text).startswith(
        "16:3: devices.cod.driver: missing required key 'driver': bus 'rs485-1' is a serial bus")


def test_unknown_bus_type(tmp_path: Path) -> None:
    text = GOOD.replace("{type: rtu,", "{type: rs485,")
    found = problems_of(write(tmp_path, text))
    assert found[0].split(":", 1)[1] == "9:19: buses.rs485-1.type: unknown type 'rs485'; use 'rtu', 'tcp', 'serial'"


def test_bad_register_entry_points_at_the_key(tmp_path: Path) -> None:
    text = GOOD.replace("    profile: cod-analyzer", """\
    registers:
      - {channel: w01018, address: 70000, type: float32}
      - {channel: w21003, address: 2, typ: float32}""")
    found = [p.split(":", 1)[1] for p in problems_of(write(tmp_path, text))]
    assert found[0].startswith("20:36: devices.cod.registers.0.address: 70000 is outside 0..65535")
    assert found[1] == "21:39: devices.cod.registers.1.typ: unknown key 'typ' (did you mean 'type'?)"


def test_every_problem_of_one_register_entry_is_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("    profile: cod-analyzer", """\
    registers:
      - {channel: w01018-avg, address: -5, type: int8}
      - {channel: ok2, address: 70000, order: XYZ}""")
    found = [p.split(":", 1)[1] for p in problems_of(write(tmp_path, text))]
    assert [f.split(": ")[1] for f in found] == [
        "devices.cod.registers.0.channel", "devices.cod.registers.0.address", "devices.cod.registers.0.type",
        "devices.cod.registers.1.address", "devices.cod.registers.1.order"], found


def test_simulated_channel_codes_have_no_dash(tmp_path: Path) -> None:
    text = GOOD.replace("      a34004:", "      a34004-Rtd:")
    assert single_problem(tmp_path, text).startswith("15:7: devices.sim.channels.a34004-Rtd: channel code")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("    interval: 1", "    intervall: 1").replace("slave: 1", "slave: 300").replace(
        "type: other", "type: factory") + "alarms:\n  - {channel: sim.x, above: 1}\n"
    found = [p.split(":", 1)[1] for p in problems_of(write(tmp_path, text))]
    assert [f.split(": ")[0] for f in found] == [
        "3:9", "13:5", "18:12", "21:15",
    ], found  # in file order


def test_password_file_is_read_without_its_newline(tmp_path: Path) -> None:
    (tmp_path / "mqtt.pass").write_text("s3cret\n")
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883",
                        "  url: mqtt://127.0.0.1:1883\n  username: u\n  password_file: mqtt.pass")
    config = load_config(write(tmp_path, text), env={})
    assert config.mqtt.read_password() == "s3cret"
    (tmp_path / "mqtt.pass").unlink()
    with pytest.raises(ConfigError) as info:
        config.mqtt.read_password()
    assert "cannot read the password file: No such file or directory" in str(info.value)
    assert check_files(config)[0].path == "mqtt.password_file"
    with pytest.raises(ConfigError, match="mqtt.password_file: file not found"):
        load_config(tmp_path / "station.yaml", env={}, check_files=True)


@pytest.mark.parametrize("content, says", [
    (b"", "the file is empty"),
    (b"\n", "the file is empty"),
    (b"s3cret\n\n", "it holds more than one line (it must hold the password alone, on one line)"),
    (b"user\ns3cret\n", "it holds more than one line (it must hold the password alone, on one line)"),
])
def test_a_password_file_that_cannot_hold_one_password_is_refused(tmp_path: Path, content: bytes, says: str) -> None:
    """A file made with `touch`, or with a second line (a user name above, a blank line below), was
    taken as it was: an empty password or one with a line break in it, that the broker refused at the
    site while check-config said OK."""
    (tmp_path / "mqtt.pass").write_bytes(content)
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883",
                        "  url: mqtt://127.0.0.1:1883\n  username: u\n  password_file: mqtt.pass")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={}, check_files=True)
    assert [str(p).split(": ", 1)[1] for p in info.value.problems] == [
        f"mqtt.password_file: cannot read the password file: {says}"], info.value.problems


def test_a_password_file_saved_with_a_byte_order_mark_gives_the_password_without_it(tmp_path: Path) -> None:
    (tmp_path / "mqtt.pass").write_bytes(b"\xef\xbb\xbfs3cret\r\n")  # Windows Notepad's UTF-8
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883",
                        "  url: mqtt://127.0.0.1:1883\n  username: u\n  password_file: mqtt.pass")
    assert load_config(write(tmp_path, text), env={}).mqtt.read_password() == "s3cret"


# --------------------------------------------------------------------------------------------------
# Secrets


def test_a_substituted_secret_never_appears_in_a_problem(tmp_path: Path) -> None:
    secret = "hunter2-Secret"
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", """\
  url: "${MQTT_PASS}"
  client_id: ""
  username: u
  password: ${MQTT_PASS}
  qos: ${MQTT_PASS}
  topic_prefix: "${MQTT_PASS}#"
""").replace("id: ST01", 'id: "${MQTT_PASS}!"').replace("profile: cod-analyzer", 'profile: "${MQTT_PASS}"')
    found = problems_of(write(tmp_path, text), env={"MQTT_PASS": secret})
    assert len(found) >= 5, found
    for problem in found:
        assert secret not in problem


def test_a_literal_password_is_never_echoed(tmp_path: Path) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", "  url: mqtt://h\n  username: u\n  password: [pa55word]")
    found = single_problem(tmp_path, text)
    assert found.startswith("9:13: mqtt.password: expected text") and "pa55word" not in found


PASTED_KEY = """\
      -----BEGIN PRIVATE KEY-----
      MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSekritKeyMaterial
      -----END PRIVATE KEY-----"""


def test_a_secret_given_where_its_file_belongs_is_never_echoed(tmp_path: Path) -> None:
    """A key pasted into `tls.key`, a password typed as `password_file`: check-config and run say
    what is wrong without showing them; a value that is plausibly a path is still shown."""
    from harness import run_cli

    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", f"""\
  url: mqtts://127.0.0.1
  username: u
  password_file: Hunter2Sekrit
  tls:
    ca: ca.pem
    cert: "-----BEGIN CERTIFICATE----- MIIBszCCAVmgAwIBAgIUPastedCertText"
    key: |
{PASTED_KEY}""") + 'console: {password_file: "~Sekrit9x"}\n'
    path = write(tmp_path, port_here(tmp_path, text))
    pasted = "this is not a file path: it looks like the {} itself (put it in a file and give the file's path)"
    expected = [
        "9:18: mqtt.password_file: file not found (the value is not shown: it may be the secret itself; give the "
        "path of the file)",
        f"11:9: mqtt.tls.ca: file not found: {tmp_path / 'ca.pem'}",
        "12:11: mqtt.tls.cert: " + pasted.format("certificate"),
        "13:10: mqtt.tls.key: " + pasted.format("key"),
        "29:26: console.password_file: cannot expand '~': unknown user or no home directory",
    ]
    with pytest.raises(ConfigError) as loaded:
        load_config(path, env={}, check_files=True)
    with pytest.raises(ConfigError) as parsed:
        parse_config(path.read_text(), file="station.yaml", env={}, base_dir=tmp_path, check_files=True)
    checked = run_cli("check-config", str(path))
    ran = run_cli("run", "-c", str(path), timeout=30)
    assert [str(p)[len(str(path)) + 1:] for p in loaded.value.problems] == expected
    assert [str(p) for p in parsed.value.problems] == [f"station.yaml:{line}" for line in expected]
    assert (checked.returncode, checked.stderr) == (2, "".join(f"{path}:{line}\n" for line in expected))
    assert (ran.returncode, ran.stderr) == (2, checked.stderr)
    every = "\n".join([*map(str, loaded.value.problems + parsed.value.problems), checked.stderr, ran.stderr])
    for secret in ("Hunter2Sekrit", "SekritKeyMaterial", "PastedCertText", "Sekrit9x", "BEGIN"):
        assert secret not in every, secret


def test_status_on_a_file_with_problems_says_what_a_running_agent_does(tmp_path: Path) -> None:
    """The technician's edit has a typo and the reload was refused: `status -c` names the problem and
    says that the agent runs on with the configuration it had (it said only the problem)."""
    from harness import run_cli

    path = write(tmp_path, GOOD.replace("  url: mqtt://", "  ulr: mqtt://"))
    shown = run_cli("status", "-c", str(path))
    assert shown.returncode == 2
    *problems, last = shown.stderr.splitlines()
    assert f"{path}:7:3: mqtt.ulr: unknown key 'ulr' (did you mean 'url'?)" in problems
    assert last == (f"edge-agent status: {path} has the problems above, so the buffer it names is not read; "
                      "a running agent keeps the configuration it last loaded (a reload of this file is refused)")


def test_status_of_a_station_without_a_name_shows_its_id_alone(tmp_path: Path) -> None:
    """`station.name` is optional: the status line is the id, not `ST01 ()`."""
    from harness import run_cli

    shown = run_cli("status", "-c", str(write(tmp_path, GOOD)))
    assert shown.returncode == 0, shown.stderr
    assert "station  ST01" in shown.stdout.splitlines(), shown.stdout


def test_tls_errors_at_run_name_no_file_that_may_be_the_secret(tmp_path: Path) -> None:
    """The publisher's `cannot use the TLS files: ...` names a file only where check-config would: a
    key file named like a password (no '/' nor '.') stays unnamed even once the file is there."""
    from agent.runtime import broker_settings
    from agent.tlsfiles import TlsFilesError, tls_context

    (tmp_path / "client.pem").write_text("not a certificate\n")
    (tmp_path / "Hunter2Sekrit").write_text("not a key either\n")
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883",
                        "  url: mqtts://127.0.0.1\n  tls: {cert: client.pem, key: Hunter2Sekrit}")
    config = load_config(write(tmp_path, text), env={}, check_files=True)  # every file is there
    assert config.tls_file_names() == {"ca": None, "cert": str(tmp_path / "client.pem"), "key": None}
    settings = broker_settings(config)
    with pytest.raises(TlsFilesError) as info:
        tls_context(settings.tls_ca, settings.tls_cert, settings.tls_key, names=settings.tls_names)  # as it connects
    assert str(info.value).startswith(f"mqtt.tls.cert ({tmp_path / 'client.pem'}): ")
    assert "Hunter2Sekrit" not in str(info.value)
    (tmp_path / "client.key").write_text("not a key either\n")
    shown = load_config(write(tmp_path, text.replace("key: Hunter2Sekrit", "key: client.key")), env={})
    assert shown.tls_file_names()["key"] == str(tmp_path / "client.key")


def test_a_key_or_password_file_other_users_may_read_is_a_warning() -> None:
    """A client key or a password file copied with the usual mode 0644 (scp, a renewal script) into a
    directory others may enter can be read by every user of the gateway: check-config said OK. It is a
    warning there and in run's log (`log_config_warnings`), never quoting the file. 0600 and 0640
    (install.sh's root:edge-agent) are fine, and so is any mode inside a directory others cannot
    enter (install.sh's /etc/edge-agent, 0750)."""
    import subprocess
    import tempfile

    from harness import run_cli

    with tempfile.TemporaryDirectory(dir="/tmp") as name:  # /tmp: others may enter (pytest's own dirs: 0700)
        tmp_path = Path(name)
        tmp_path.chmod(0o755)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", str(tmp_path / "client.key"), "-out", str(tmp_path / "client.pem"),
                        "-days", "400", "-subj", "/CN=station"], check=True, capture_output=True)
        (tmp_path / "mqtt.pass").write_text("s3cret-broker\n")
        (tmp_path / "console.pass").write_text("s3cret-console\n")
        text = GOOD.replace("  url: mqtt://127.0.0.1:1883",
                            "  url: mqtts://127.0.0.1:1\n  username: u\n  password_file: mqtt.pass\n"
                            "  tls: {ca: client.pem, cert: client.pem, key: client.key}")
        path = write(tmp_path, port_here(tmp_path, text) + "console: {password_file: console.pass}\n")
        for file, mode in (("client.key", 0o600), ("mqtt.pass", 0o640), ("console.pass", 0o600)):
            (tmp_path / file).chmod(mode)
        quiet = run_cli("check-config", str(path))
        assert (quiet.returncode, quiet.stderr) == (0, ""), quiet.stderr
        for file, mode in (("client.key", 0o644), ("mqtt.pass", 0o604), ("console.pass", 0o666)):
            (tmp_path / file).chmod(mode)
        loud = run_cli("check-config", str(path))
        assert loud.returncode == 0, loud.stderr
        lines = loud.stderr.splitlines()
        for key, mode in (("mqtt.password_file", "0604"), ("mqtt.tls.key", "0644"),
                          ("console.password_file", "0666")):
            said = f": {key}: warning: other users of this machine may read or change it (mode {mode})"
            assert [line for line in lines if said in line], (key, lines)
        assert "s3cret" not in loud.stderr and "PRIVATE KEY" not in loud.stderr
        tmp_path.chmod(0o750)  # as install.sh keeps /etc/edge-agent: others cannot reach the files
        closed = run_cli("check-config", str(path))
        assert (closed.returncode, closed.stderr) == (0, ""), closed.stderr


def test_a_console_reachable_from_the_network_that_takes_the_mqtt_password_is_a_warning(tmp_path: Path) -> None:
    """The console speaks plain HTTP: on a non-loopback address the browser sends its password over the
    network at every refresh (every 3 s). A technician who gave it the MQTT password's file (or the same
    password) handed the station's broker login to anyone on the LAN who listens: said by check-config
    (and in the log at start), never the password itself."""
    from harness import run_cli

    (tmp_path / "mqtt.pass").write_text("s3cret-broker\n")
    (tmp_path / "console.pass").write_text("s3cret-broker\n")
    for name in ("mqtt.pass", "console.pass"):
        (tmp_path / name).chmod(0o600)
    mqtt = "  url: mqtts://127.0.0.1:1\n  username: u\n  password_file: mqtt.pass"
    said = "console.password_file: warning: is the MQTT password: the console sends it unencrypted"
    for console, warned in (("{listen: '0.0.0.0:8080', password_file: mqtt.pass}", True),
                            ("{listen: '0.0.0.0:8080', password_file: console.pass}", True),
                            ("{listen: '127.0.0.1:8080', password_file: console.pass}", False)):
        text = port_here(tmp_path, GOOD.replace("  url: mqtt://127.0.0.1:1883", mqtt)) + f"console: {console}\n"
        result = run_cli("check-config", str(write(tmp_path, text)))
        assert result.returncode == 0 and (said in result.stderr) == warned, (console, result.stderr)
        assert "s3cret" not in result.stderr
    (tmp_path / "console.pass").write_text("s3cret-console\n")
    result = run_cli("check-config", str(write(tmp_path, text.replace("127.0.0.1:8080", "0.0.0.0:8080"))))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_check_config_reads_the_password_file_as_run_does(tmp_path: Path) -> None:
    """A password file that is not UTF-8: check-config says so where run does, in the same words."""
    from harness import run_cli

    (tmp_path / "mqtt.pass").write_bytes(b"p\xe4ssword\n")  # Latin-1
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883",
                        "  url: mqtts://127.0.0.1:1\n  username: u\n  password_file: mqtt.pass")
    path = write(tmp_path, port_here(tmp_path, text))
    expected = f"{path}:9:18: mqtt.password_file: cannot read the password file: not UTF-8 text\n"
    checked = run_cli("check-config", str(path))
    ran = run_cli("run", "-c", str(path), timeout=30)
    assert (checked.returncode, checked.stderr) == (2, expected)
    assert (ran.returncode, ran.stderr) == (2, expected)
    (tmp_path / "mqtt.pass").write_text("pässword\n")
    console = write(tmp_path, text + "console: {password_file: mqtt.pass}\n", "console.yaml")
    assert load_config(console, env={}, check_files=True).read_mqtt_password() == "pässword"
    (tmp_path / "mqtt.pass").write_bytes(b"p\xe4ssword\n")
    assert problems_of_files(console) == [  # the console reads its password file as run reads the broker's
        f"{console}:9:18: mqtt.password_file: cannot read the password file: not UTF-8 text",
        f"{console}:22:26: console.password_file: cannot read the password file: not UTF-8 text",
    ]


def problems_of_files(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, check_files=True)
    return [str(p) for p in info.value.problems]


def test_substitute_errors_name_the_variable_not_the_text() -> None:
    assert substitute("a${X}b${Y}", {"X": "1", "Y": "2"}).text == "a1b2"
    assert substitute("$${X}", {}).text == "${X}"
    with pytest.raises(SubstitutionError, match="environment variables not set: A, B"):
        substitute("${A}${B}", {})
    with pytest.raises(SubstitutionError) as info:
        substitute("pa${ss word}", {})
    assert "ss word" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# Fixture files (tests as data): each bad file starts with `# expect: LINE:COL: path: message-prefix`


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("bad-*.yaml")), ids=lambda p: p.stem)
def test_fixture_is_refused_as_expected(path: Path) -> None:
    expected = [line.split("# expect:", 1)[1].strip()
                for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("# expect:")]
    assert expected, f"{path.name} has no '# expect:' line"
    found = [p[len(str(path)) + 1:] for p in problems_of(path, env={"HJ212_PW": "x"})]
    assert len(found) == len(expected), found
    for got, want in zip(found, expected, strict=True):
        assert got.startswith(want), (got, want)


def test_parse_config_reports_the_given_file_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("station: [", file="inline.yaml")
    assert str(info.value.problems[0]).startswith("inline.yaml:")


# --------------------------------------------------------------------------------------------------
# Audit of check-config / run (no traceback, no secret on stderr, every problem, warnings)


def test_empty_optional_keys_are_as_if_not_given(tmp_path: Path) -> None:
    text = GOOD.replace("    profile: cod-analyzer", "    profile:") + (
        "alarms:\n  - {channel: sim.a34004, preset: ~, above: 3, background: }\n")
    assert single_problem(tmp_path, text) == (
        "16:3: devices.cod.profile: missing required key 'profile' (or inline 'registers'): a Modbus device "
        "needs a register map")
    config = load_config(write(tmp_path, GOOD + "alarms:\n  - {channel: sim.a34004, preset: ~, background: ~, "
                                                 "above: 3}\n"), env={})
    assert config.alarms[0].preset is None and config.alarms[0].background is None


@pytest.mark.parametrize("tag", ["!!int", "!!float", "!!bool", "!!binary"])
def test_a_value_that_does_not_fit_its_tag_is_a_problem_that_never_quotes_it(tmp_path: Path, tag: str) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883",
                        f"  url: mqtt://127.0.0.1:1883\n  username: u\n  password: {tag} Hunter2Secret")
    assert single_problem(tmp_path, text) == (
        f"9:13: mqtt.password: the value does not fit its YAML tag {tag} (remove the tag, or quote the value for "
        "text)")


def test_a_password_that_yaml_reads_as_a_tag_or_an_alias_is_not_quoted(tmp_path: Path) -> None:
    def with_password(value: str) -> str:
        return GOOD.replace("  url: mqtt://127.0.0.1:1883", f"  url: mqtt://h\n  username: u\n  password: {value}")

    assert single_problem(tmp_path, with_password("!Hunter2Secret")) == (
        "9:13: mqtt.password: unsupported YAML tag (put a value that starts with '!' in quotes)")
    assert single_problem(tmp_path, with_password("!Hunter2Secret").replace("password:", "password_file:")) == (
        "9:18: mqtt.password_file: unsupported YAML tag (put a value that starts with '!' in quotes)")
    assert single_problem(tmp_path, with_password("*Hunter2Secret")) == (
        f"9:13: {FILE_PATH}: YAML syntax error: found undefined alias (put a value that starts with '*' in quotes)")
    assert single_problem(tmp_path, GOOD.replace("type: other", "type: !ab other")) == (
        "3:9: station.type: unsupported YAML tag '!ab' (put a value that starts with '!' in quotes)")


def test_paths_the_system_refuses_are_problems_not_crashes(tmp_path: Path) -> None:
    long = "x" * 300
    text = GOOD.replace("path: ./data/buffer.db", f"path: ./{long}.db").replace("  url: mqtt://127.0.0.1:1883", f"""\
  url: mqtts://127.0.0.1
  username: u
  password_file: {long}
  tls: {{ca: "~no-such-user-here/ca.pem", cert: /{long}/c.pem, key: k.pem}}""")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, check_files=True)
    tls_line = text.splitlines()[9]
    cert_col, key_col = tls_line.index(f"/{long}/") + 1, tls_line.index("k.pem") + 1
    assert [str(p)[len(str(path)) + 1:] for p in info.value.problems] == [
        "5:9: storage.path: cannot use this path: File name too long",
        "9:18: mqtt.password_file: cannot use this path: File name too long",
        "10:13: mqtt.tls.ca: cannot expand '~' in '~no-such-user-here/ca.pem': unknown user or no home directory",
        f"10:{cert_col}: mqtt.tls.cert: cannot use this path: File name too long",
        f"10:{key_col}: mqtt.tls.key: file not found: {tmp_path / 'k.pem'}",
    ]


def test_missing_files_are_reported_with_the_other_problems(tmp_path: Path) -> None:
    text = GOOD.replace("    interval: 1", "    intervall: 1").replace("  url: mqtt://127.0.0.1:1883", """\
  url: mqtts://127.0.0.1
  username: u
  password_file: mqtt.pass
  tls: {ca: ca.pem}""")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, check_files=True)
    assert [str(p)[len(str(path)) + 1:] for p in info.value.problems] == [
        f"9:18: mqtt.password_file: file not found: {tmp_path / 'mqtt.pass'}",
        f"10:13: mqtt.tls.ca: file not found: {tmp_path / 'ca.pem'}",
        "16:5: devices.sim.intervall: unknown key 'intervall' (did you mean 'interval'?)",
    ]


def test_a_missing_password_file_is_reported_beside_the_missing_username(tmp_path: Path) -> None:
    """Two problems of one key, both in one pass: the technician fixes both at once."""
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", """\
  url: mqtt://127.0.0.1:1883
  password_file: mqtt.pass""")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, check_files=True)
    assert [str(p)[len(str(path)) + 1:] for p in info.value.problems] == [
        "8:3: mqtt.password_file: a password needs a username (MQTT sends no password without a user name)",
        f"8:18: mqtt.password_file: file not found: {tmp_path / 'mqtt.pass'}",
    ]

def test_a_quoted_number_is_taken_where_one_of_a_few_numbers_is_expected(tmp_path: Path) -> None:
    """As by every other number key: `qos: "0"`, `bytesize: "${BITS}"`, `minute: '5'`."""
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", '  url: mqtt://127.0.0.1:1883\n  qos: "0"').replace(
        "{type: rtu, port: /dev/ttyUSB0}", '{type: rtu, port: /dev/ttyUSB0, bytesize: "${BITS}", stopbits: "2"}')
    config = load_config(write(tmp_path, text + "aggregate: {minute: '5'}\n"), env={"BITS": "7"})
    bus = config.buses["rs485-1"]
    assert (config.mqtt.qos, bus.bytesize, bus.stopbits, config.aggregate.minute) == (0, 7, 2, 5)
    assert "must be 0 or 1" in single_problem(tmp_path, GOOD.replace(
        "  url: mqtt://127.0.0.1:1883", '  url: mqtt://127.0.0.1:1883\n  qos: "2"'))

def test_yes_no_is_no_number_but_numbers_keep_working(tmp_path: Path) -> None:
    text = GOOD.replace("id: ST01", "id: 14010500000017").replace("  url: mqtt://127.0.0.1:1883", """\
  url: mqtt://127.0.0.1:1883
  max_batch: ${BATCH}
  reconnect_max: 10
  keepalive: "${KEEPALIVE}\"""") + "aggregate: {hour: false, day: true}\n"
    config = load_config(write(tmp_path, text), env={"BATCH": "50", "KEEPALIVE": "60"})
    assert config.station.id == "14010500000017"
    assert (config.mqtt.max_batch, config.mqtt.reconnect_max, config.mqtt.keepalive) == (50, 10.0, 60)
    assert (config.aggregate.hour, config.aggregate.day) == (False, True)
    assert single_problem(tmp_path, text.replace("hour: false", "hour: 0"), env={"BATCH": "50", "KEEPALIVE": "6"}) \
        == "23:19: aggregate.hour: expected true or false (got 0)"
    assert single_problem(tmp_path, text, env={"BATCH": "yes", "KEEPALIVE": "6"}) == (
        "8:14: mqtt.max_batch: expected a whole number (got 'yes')")


def test_hj212_password_rules_are_checked_with_the_config(tmp_path: Path) -> None:
    text = GOOD + 'hj212: {st: 32, pw: "pw;with;semicolons&&"}\n'
    found = single_problem(tmp_path, text)
    assert found == ("20:21: hj212.pw: the HJ 212 password must be at most 6 printable ASCII characters without "
                     "space or ; , & =")
    assert "semicolons" not in found
    assert load_config(write(tmp_path, GOOD + "hj212: {st: 32, pw: 012345}\n"), env={}).hj212.pw == "012345"


def test_hj212_st_91_system_interaction_is_refused_as_the_stations_system_code(tmp_path: Path) -> None:
    """ST=91 is DOMAIN.md's "system interaction" (answers and commands), never a station's data: every packet of
    such a station went out as system interaction, which a platform does not store nor acknowledge."""
    found = single_problem(tmp_path, GOOD + 'hj212: {st: 91, pw: "123456"}\n')
    assert found.startswith("20:13: hj212.st: ST 91 is the system interaction code"), found
    assert load_config(write(tmp_path, GOOD + 'hj212: {st: 39, pw: "123456"}\n'), env={}).hj212.st == 39


def test_hj212_password_rule_is_the_one_packets_are_encoded_with() -> None:
    from agent.config import HJ212_PW_RE
    from agent.hj212 import Packet, encode

    for pw in [chr(c) * n for c in range(0x20, 0x80) for n in (1, 6, 7)] + ["", "中", "ab\tc"]:
        try:
            encode(Packet(st="32", cn="2011", pw=pw, mn="ST01", cp=[]))
            encodable = True
        except ValueError:
            encodable = False
        assert encodable == bool(HJ212_PW_RE.fullmatch(pw)), repr(pw)


def test_the_spec_example_is_valid_with_three_warnings() -> None:
    """Two rules name devices it lacks; `pm` and `sim` both measure a34004, which its HJ 212 uplink cannot
    tell apart."""
    path = FIXTURES / "spec-example.yaml"
    config = load_config(path, env={"MQTT_USER": "u", "HJ212_PW": "123456"})
    assert len(config.alarms) == 5
    assert [str(w)[len(str(path)) + 1:] for w in config.warnings] == [
        "50:3: devices.sim: warning: channel a34004 is also measured by device 'pm': HJ 212 packets name a "
        "pollutant by its code alone (MN is the station), so a platform cannot tell the two a34004 apart (it "
        "merges or overwrites them); give one of them another channel code",
        "73:15: alarms.4.channel: warning: unknown device 'dust': the rule does nothing; devices: cod, nh3n, pm, sim",
        "73:69: alarms.4.action.device: warning: unknown device 'fog': the action is skipped; devices: cod, nh3n, "
        "pm, sim",
    ]


def test_a_second_rule_for_the_same_alarm_is_a_warning(tmp_path: Path) -> None:
    """`run` applies the first rule of an alarm id (channel:rule) and ignores the others: say so."""
    path = write(tmp_path, GOOD + "alarms:\n  - {channel: sim.a34004, above: 50}\n"
                                  "  - {channel: sim.a34004, above: 60, below: 1}\n")
    config = load_config(path, env={})
    assert [str(w)[len(str(path)) + 1:] for w in config.warnings] == [
        "22:27: alarms.1.above: warning: same channel and rule (sim.a34004:above) as alarms.0, which takes "
        "precedence: this one is ignored"]

def test_braces_of_a_bad_value_are_shown_as_written(tmp_path: Path) -> None:
    problem = single_problem(tmp_path, GOOD.replace("  sim:\n", "  ${DV}:\n"))
    assert "device id '${DV}'" in problem, problem


def test_a_one_letter_password_is_not_masked_inside_words(tmp_path: Path) -> None:
    """Masking "p" in "password" would garble the message and show the password."""
    path = write(tmp_path, GOOD.replace("  url: mqtt://127.0.0.1:1883", """\
  url: mqtt://127.0.0.1:1883
  username: u
  password: ${ONE_LETTER}"""))
    config = load_config(path, env={"ONE_LETTER": "p"})
    texts = [str(w) for w in config.warnings]
    assert texts and all("${ONE_LETTER}assword" not in t for t in texts), texts
    assert any("password" in t for t in texts), texts

def test_a_preset_without_a_limit_for_the_channel_is_a_warning(tmp_path: Path) -> None:
    text = GOOD + """\
alarms:
  - {channel: sim.a34004, preset: gb3838-iii}
  - {channel: "sim.*", preset: gb18918-1a}
  - {channel: "sim.*", preset: gb3095-2012-ii}
"""
    path = write(tmp_path, text)
    assert [str(w)[len(str(path)) + 1:] for w in load_config(path, env={}).warnings] == [
        "21:35: alarms.0.preset: warning: preset 'gb3838-iii' has no limit for channel code 'a34004': the rule does "
        "nothing; it has limits for: w01018, w21003",
        "22:32: alarms.1.preset: warning: preset 'gb18918-1a' has no limit for any channel of this device: the rule "
        "does nothing; it has limits for: w01018, w21003",
    ]


def test_a_stale_rule_not_longer_than_a_poll_interval_is_a_warning(tmp_path: Path) -> None:
    # Its alarm would be raised before each poll and cleared at it (cod is polled every 60 s by default).
    text = GOOD + """\
alarms:
  - {channel: "*", stale: 60}
  - {channel: sim.a34004, stale: 1}
  - {channel: "cod.*", stale: 180}
  - {channel: dust.a34002, stale: 30}
"""
    path = write(tmp_path, text)
    assert [str(w)[len(str(path)) + 1:] for w in load_config(path, env={}).warnings] == [
        "21:27: alarms.0.stale: warning: stale 60 s is not longer than the poll interval of cod (interval 60 s): "
        "the alarm would be raised before each poll and cleared at it; give a few intervals",
        "22:34: alarms.1.stale: warning: stale 1 s is not longer than the poll interval of sim (interval 1 s): "
        "the alarm would be raised before each poll and cleared at it; give a few intervals",
        "24:15: alarms.3.channel: warning: unknown device 'dust': the rule does nothing; devices: cod, sim",
    ]


def test_run_logs_the_stale_rule_warning_which_the_alarm_engine_does_not_say(tmp_path: Path, caplog) -> None:
    from agent.runtime import log_config_warnings

    path = write(tmp_path, GOOD + "alarms:\n  - {channel: \"*\", stale: 30}\n  - {channel: fog.x, above: 1}\n")
    with caplog.at_level("WARNING", logger="agent.runtime"):
        log_config_warnings(load_config(path, env={}))
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "alarms.0.stale: warning: stale 30 s is not longer than the poll interval of cod (interval 60 s): the alarm "
        "would be raised before each poll and cleared at it; give a few intervals"]


def test_warnings_come_with_the_problems_and_apart_from_them(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("type: other", "type: factory") + "alarms:\n  - {channel: fog.x, above: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert [p.path for p in info.value.problems] == ["station.type"]
    assert [(w.path, w.warning) for w in info.value.warnings] == [("alarms.0.channel", True)]


def test_check_config_prints_warnings_on_stderr_and_exits_0(tmp_path: Path) -> None:
    from harness import run_cli

    path = write(tmp_path, port_here(tmp_path, GOOD) + "alarms:\n  - {channel: sim.a34004, above: 1, action: "
                                                       "{device: fog, coil: 0}}\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"{path}:21:54: alarms.0.action.device: warning: unknown device 'fog': the action is "
                             "skipped; devices: cod, sim\n")
    assert result.stdout.startswith(f"{path}: OK")


def test_run_refuses_an_unreadable_password_file_in_one_line(tmp_path: Path) -> None:
    from harness import run_cli

    text = GOOD.replace("  url: mqtt://127.0.0.1:1883",
                        "  url: mqtt://127.0.0.1:1\n  username: u\n  password_file: nope.pass")
    path = write(tmp_path, text)
    result = run_cli("run", "-c", str(path), timeout=30)
    assert result.returncode == 2
    # The same lines as check-config's: run checks the files a config names as check-config does, and
    # prints the warnings of a file it refuses beside its problems (here: GOOD's serial port, missing).
    assert f"{path}:9:18: mqtt.password_file: file not found: {tmp_path / 'nope.pass'}" in result.stderr.splitlines()
    assert result.stderr == run_cli("check-config", str(path), timeout=30).stderr
    assert all(": warning: " in line for line in result.stderr.splitlines() if ":9:18: " not in line), result.stderr
    assert not (tmp_path / "data").exists()  # refused before anything started


def test_alarm_engine_skips_rules_and_actions_on_devices_not_configured() -> None:
    from agent.alarms import AlarmEngine
    from agent.model import Reading

    config = parse_config(GOOD + """\
alarms:
  - {channel: dust.a34002, stale: 1}
  - {channel: "dust.*", above: 1}
  - {channel: sim.a34004, above: 1, action: {device: fog, coil: 0}}
""")
    events: list[dict] = []
    writes: list[tuple] = []
    clock = [0.0]

    class Recorder:
        def submit_event(self, stream: str, ts_ms: int, body: dict) -> None:
            events.append(body)

        def set_meta(self, key: str, value: str, *, keep_beside: bool = False) -> None:
            pass

    engine = AlarmEngine(config, Recorder(), None, lambda *args: writes.append(args), clock=lambda: clock[0],
                         wall_ms=lambda: 1_790_000_000_000 + int(clock[0] * 1000), inline_actions=True)
    t0 = 1_790_000_000_000
    engine.observe([Reading("sim", "a34004", t0, 50.0), Reading("dust", "a34002", t0, 50.0)])
    clock[0] = 10.0
    engine.tick()
    assert [(e["id"], e["state"]) for e in events] == [("sim.a34004:above", "raised")]
    assert writes == []


def test_control_characters_are_located_and_escaped(tmp_path: Path) -> None:
    text = GOOD.replace("{unit: ug/m3, mean: 45}", '{unit: "ug\x1bm3", mean: 45}')
    assert single_problem(tmp_path, text) == (
        f"15:25: {FILE_PATH}: YAML syntax error: character U+001B is not allowed (no control characters but tab and "
        "line breaks; remove it)")
    text = GOOD.replace("  sim:\n", '  "sim\\n":\n').replace("  url: mqtt://127.0.0.1:1883",
                                                             '  url: mqtt://127.0.0.1:1883\n  topic_prefix: "env\\n"')
    path = write(tmp_path, text)
    assert [p[len(str(path)) + 1:] for p in problems_of(path)] == [
        "8:17: mqtt.topic_prefix: must not contain line breaks, tabs or other control characters",
        "12:3: devices.sim\\n: device id 'sim\\n' may only contain a-z (lower case), 0-9, '_' and '-'",
    ]


@pytest.mark.parametrize("prefix", ["env/#", "env/+/x", "e\tnv"])
def test_topic_prefix_refuses_wildcards_and_control_characters(tmp_path: Path, prefix: str) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", f'  url: mqtt://127.0.0.1:1883\n  topic_prefix: "{prefix}"')
    assert single_problem(tmp_path, text).startswith("8:17: mqtt.topic_prefix: must not contain ")


@pytest.mark.parametrize("prefix", ["$SYS/env", "$share/g/env", "$env"])
def test_topic_prefix_refuses_the_brokers_own_dollar_topics(tmp_path: Path, prefix: str) -> None:
    """MQTT reserves topics beginning with '$' for the broker: mosquitto acknowledges a PUBLISH to
    $SYS/... and delivers it to nobody, so every reading would count as sent and be lost."""
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", f'  url: mqtt://127.0.0.1:1883\n  topic_prefix: "{prefix}"')
    assert single_problem(tmp_path, text).startswith("8:17: mqtt.topic_prefix: must not begin with '$'")


def test_only_secret_values_are_redacted(tmp_path: Path) -> None:
    text = GOOD.replace("type: other", "type: outfal").replace("  url: mqtt://127.0.0.1:1883", """\
  url: mqtt://127.0.0.1:1883
  username: "${MQTT_USER}"
  password: ${MQTT_PASS}
  client_id: "${MQTT_PASS}-1"
  qos: "${MQTT_USER}\"""")
    path = write(tmp_path, text)
    found = [p[len(str(path)) + 1:] for p in problems_of(path, env={"MQTT_USER": "outfall", "MQTT_PASS": "pw7"})]
    assert found == [
        "3:9: station.type: must be 'river_section', 'outfall', 'dust' or 'other' (got 'outfal')",
        "11:8: mqtt.qos: must be 0 or 1 (got 'outfall')",
    ]
    text = text.replace('client_id: "${MQTT_PASS}-1"', 'client_id: ""').replace('qos: "${MQTT_USER}"', "qos: 1")
    text = text.replace("id: ST01", 'id: "${MQTT_PASS}!"')
    found = [p[len(str(path)) + 1:] for p in problems_of(write(tmp_path, text), env={"MQTT_USER": "outfall",
                                                                                     "MQTT_PASS": "pw7"})]
    assert found == [
        "2:7: station.id: station id '${MQTT_PASS}!' must be 1 to 24 characters of A-Z, a-z, 0-9, '_' or '-'",
        "3:9: station.type: must be 'river_section', 'outfall', 'dust' or 'other' (got 'outfal')",
        "10:14: mqtt.client_id: must not be empty",
    ]


def test_min_count_accepts_the_readme_spelling(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD + "aggregate: {min_count: {10m: 8, 1h: 45, 1d: 20}}\n"), env={})
    assert config.aggregate.min_count is not None
    assert (config.aggregate.min_count.minute, config.aggregate.min_count.hour,
            config.aggregate.min_count.day) == (8, 45, 20)
    assert single_problem(tmp_path, GOOD + "aggregate: {min_count: {1h: 0}}\n") == (
        "20:29: aggregate.min_count.1h: must be at least 1 (got 0)")


def test_an_editor_validating_with_the_schema_accepts_the_shipped_configs_and_flags_the_usual_mistakes() -> None:
    import jsonschema
    import yaml

    validator = jsonschema.Draft202012Validator(json_schema())
    for url in ("mqtt://[::1]:1883", "MQTTS://broker.example", "mqtt://h:08883/", "mqtt://h:65535", "mqtt://h:1",
                "mqtt://h:59999", "mqtt://h:9", "${BROKER}"):
        assert not list(validator.iter_errors({**yaml.safe_load(GOOD), "mqtt": {"url": url}})), url
    files = [*sorted((REPO / "config").rglob("*.yaml")), Path(__file__).parent / "configs" / "spec-example.yaml"]
    for file in files:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(file.read_text()))]
        assert errors == [], f"{file.name}: {errors}"
    good = yaml.safe_load(GOOD)
    for mistake in ({"devices": {**good["devices"], "COD": good["devices"]["cod"]}},  # upper case device id
                    {"mqtt": {"url": "http://127.0.0.1:1883"}},
                    {"mqtt": {"url": "mqtt://127.0.0.1:0"}},
                    {"mqtt": {"url": "mqtt://127.0.0.1:65536"}},
                    {"mqtt": {"url": "mqtt://127.0.0.1:99999"}},
                    {"storage": {**good["storage"], "max_mb": float("inf")}},  # `max_mb: .inf`
                    {"alarms": [{"channel": "cod.w01018", "above": float("-inf")}]},
                    {"mqtt": {"url": "mqtt://127.0.0.1:abc"}},
                    {"devices": {"cod": {"bus": "rs485-1", "slave": 1,
                                         "registers": [{"channel": "w01-018", "address": 0}]}}},
                    {"mqtt": {"url": "mqtt://127.0.0.1:1883", "usrname": "u"}},
                    {"devices": {"sim": {"driver": "simulated", "interval": 1, "channels": {"a-b": {"mean": 1}}}}},
                    {"buses": {"rs 485": {"type": "rtu", "port": "/dev/ttyUSB0"}}}):
        assert list(validator.iter_errors({**good, **mistake})), f"the schema lets {mistake} through"

def test_quoted_choices_check_config_takes_are_valid_to_the_schema_too(tmp_path: Path) -> None:
    """`qos: "1"`, `bytesize: " 8"`, `stopbits: "+1"`, `minute: "010"`: check-config reads each as the
    number, so an editor validating with the schema must not flag them; `qos: "2"` both refuse."""
    import jsonschema
    import yaml
    from harness import run_cli

    validator = jsonschema.Draft202012Validator(json_schema())
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", '  url: mqtt://127.0.0.1:1883\n  qos: "1"').replace(
        "{type: rtu, port: /dev/ttyUSB0}", '{type: rtu, port: /dev/ttyUSB0, bytesize: " 8", stopbits: "+1"}'
    ) + 'aggregate: {minute: "010"}\n'
    text = port_here(tmp_path, text)
    path = write(tmp_path, text)
    assert [e.message for e in validator.iter_errors(yaml.safe_load(text))] == []
    checked = run_cli("check-config", str(path))
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    wrong = write(tmp_path, text.replace('qos: "1"', 'qos: "2"'), "wrong.yaml")
    assert [e.json_path for e in validator.iter_errors(yaml.safe_load(wrong.read_text()))] == ["$.mqtt.qos"]
    checked = run_cli("check-config", str(wrong))
    assert (checked.returncode, checked.stderr) == (2, f"{wrong}:8:8: mqtt.qos: must be 0 or 1 (got 2)\n")


def test_json_schema_accepts_what_check_config_accepts() -> None:
    import re

    schema = json_schema()
    defs = schema["$defs"]

    def alternatives(node: dict) -> list[dict]:
        return [node, *[a for alt in node.get("anyOf", []) for a in alternatives(alt)]]

    def accepts_type(node: dict, kind: str) -> bool:
        return any(alt.get("type") == kind for alt in alternatives(node))

    def accepts_text(node: dict, text: str) -> bool:
        """The YAML text `text` passes `node`'s own pattern and one of its string or enum alternatives."""
        if "pattern" in node and not re.search(node["pattern"], text):
            return False
        for alt in alternatives(node):
            if "enum" in alt:
                if text in alt["enum"]:
                    return True
            elif alt.get("type") == "string" and re.search(alt.get("pattern", ""), text):
                return True
        return False

    station_id = defs["Station"]["properties"]["id"]
    assert accepts_type(station_id, "integer")  # id: 14010500000017
    assert accepts_text(station_id, "${STATION}") and not accepts_text(station_id, "ST 01")
    for section in ("buses", "aggregate", "alarms", "console"):
        assert accepts_type(schema["properties"][section], "null"), section
    assert accepts_type(defs["Hj212"]["properties"]["uplinks"], "null")
    assert accepts_text(defs["RtuBus"]["properties"]["parity"], "e")
    assert accepts_text(defs["TcpBus"]["properties"]["port"], "${PORT}")
    assert accepts_text(defs["Mqtt"]["properties"]["qos"], "${QOS}")
    assert accepts_text(defs["Aggregate"]["properties"]["hour"], "yes")  # YAML 1.1 spelling, text in YAML 1.2
    pw = defs["Hj212"]["properties"]["pw"]
    assert accepts_text(pw, "${HJ212_PW}") and accepts_text(pw, "123456") and not accepts_text(pw, "1234567")
    assert defs["RegisterSpec"]["required"] == ["channel"]  # `{channel: w01018, range: [0, 500]}` overrides
    assert defs["Device"]["allOf"] == [{"if": {"not": {"required": ["profile"]}},
                                        "then": {"properties": {"registers": {"items": {"required": ["address"]}}}}}]
    assert {"minute", "hour", "day", "10m", "1h", "1d"} <= set(defs["AggregateCount"]["properties"])


def test_a_file_nested_thousands_deep_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    for text in ("station: " + "[" * 5000 + "]" * 5000 + "\n", "station: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"):
        assert single_problem(tmp_path, text) == (
            f"1:1: {FILE_PATH}: the file is nested too deeply (lists or mappings inside each other hundreds of times)")


def test_a_password_over_plain_mqtt_is_a_warning(tmp_path: Path) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883",
                        "  url: mqtt://127.0.0.1:1883\n  username: u\n  password: s3cret-pw")
    config = load_config(write(tmp_path, text), env={})
    assert [w.path for w in config.warnings] == ["mqtt.password"]
    assert "clear text over mqtt://" in str(config.warnings[0])


def test_overlapping_registers_and_an_odd_baud_rate_are_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, """station: {id: ST01, type: outfall}
storage: {path: b.db}
mqtt: {url: "mqtt://127.0.0.1:1883"}
buses:
  rs: {type: rtu, port: /dev/ttyUSB0, baudrate: 96000}
  fast: {type: rtu, port: /dev/ttyUSB1, baudrate: 115200}
devices:
  a:
    bus: rs
    slave: 1
    registers:
      - {channel: x, address: 0, type: float32}
      - {channel: y, address: 1, type: float32}
      - {channel: z, address: 2, type: uint16, table: input}
  cod:
    bus: rs
    slave: 2
    profile: cod-analyzer
    registers:
      - {channel: w01018, address: 0x43}
""")
    warnings = [str(w)[len(str(path)) + 1:] for w in load_config(path, env={}).warnings]
    assert warnings == [
        "5:49: buses.rs.baudrate: warning: 96000 is not a standard baud rate (instruments use 2400, 4800, 9600, "
        "14400, 19200, 38400, 57600...): a typo? It is set as a custom rate",
        "13:9: devices.a.registers.1: warning: x (float32 at holding 0) and y (float32 at holding 1) read the same "
        "register(s): is an address wrong?",
        "20:9: devices.cod.registers.0: warning: w01018 (float32 at holding 67) and flag (uint16 at holding 68) "
        "read the same register(s): is an address wrong?",
    ]


def test_an_rtu_bus_with_7_data_bits_is_warned_of(tmp_path: Path) -> None:
    # Modbus RTU frames are 8-bit bytes: on a 7-bit line every answer is garbled and the log blamed the
    # baudrate, parity or wiring, never this setting (a serial bus may use 7 bits: no warning there).
    path = write(tmp_path, """station: {id: ST01, type: outfall}
storage: {path: b.db}
mqtt: {url: "mqtt://127.0.0.1:1883"}
buses:
  rs: {type: rtu, port: /dev/ttyUSB0, bytesize: 7, parity: E}
  uart: {type: serial, port: /dev/ttyUSB1, bytesize: 7}
devices:
  a: {bus: rs, slave: 1, registers: [{channel: x, address: 0}]}
  pm: {bus: uart, driver: sds011, interval: 10}
""")
    warnings = [str(w)[len(str(path)) + 1:] for w in load_config(path, env={}).warnings]
    assert warnings == ["5:49: buses.rs.bytesize: warning: Modbus RTU sends 8 data bits: with 7 no answer can be "
                        "read (7 data bits are Modbus ASCII's, which the agent does not speak)"]


def test_a_duplicate_channel_and_an_invalid_entry_of_one_register_list_come_in_one_pass(tmp_path: Path) -> None:
    path = write(tmp_path, """station: {id: ST01, type: outfall}
storage: {path: b.db}
mqtt: {url: "mqtt://127.0.0.1:1883"}
buses:
  rs: {type: rtu, port: /dev/ttyUSB0}
devices:
  dev:
    bus: rs
    slave: 1
    registers:
      - {channel: a, address: 0, type: float32}
      - {channel: a, address: 10, type: uint16}
      - {channel: c, address: 20, type: int128}
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert [(p.line, p.path) for p in info.value.problems] == [
        (12, "devices.dev.registers.1.channel"), (13, "devices.dev.registers.2.type")]
    assert "channel 'a' appears twice in this device" in info.value.problems[0].message


def test_polls_faster_than_hj212_datatime_are_a_warning_when_hj212_is_spoken(tmp_path: Path) -> None:
    text = GOOD.replace("  url: mqtt://127.0.0.1:1883", "  url: mqtt://127.0.0.1:1883\n  payload: hj212")
    text += "hj212: {st: 32, pw: '123456'}\n"
    text = text.replace("interval: 1", "interval: 0.5")
    config = load_config(write(tmp_path, text), env={})
    assert [(w.path, "DataTime counts whole seconds" in w.message) for w in config.warnings] == [
        ("devices.sim.interval", True)]


# --------------------------------------------------------------------------------------------------
# What a field technician gets wrong on the wire: warned (or refused) by check-config


def test_two_modbus_devices_at_one_slave_on_one_bus_are_a_warning(tmp_path: Path) -> None:
    """One instrument may be split into two devices (its values, its status word): a warning naming the
    other device, on RTU and TCP alike; the same slave on another bus is no clash."""
    path = write(tmp_path, """station: {id: ST01, type: outfall}
storage: {path: b.db}
mqtt: {url: "mqtt://127.0.0.1:1883"}
buses:
  rs: {type: rtu, port: /dev/ttyUSB0}
  rs2: {type: rtu, port: /dev/ttyUSB1}
  lan: {type: tcp, host: 192.168.1.50}
devices:
  cod: {bus: rs, slave: 1, profile: cod-analyzer}
  cod-status: {bus: rs, slave: 1, registers: [{channel: state, address: 100}]}
  nh3n: {bus: rs2, slave: 1, profile: nh3n-analyzer}
  ph: {bus: rs, slave: 2, profile: ph-meter}
  flow: {bus: lan, slave: 1, profile: flow-meter}
  flow2: {bus: lan, slave: 1, registers: [{channel: total, address: 10, type: float64}]}
  third: {bus: rs, slave: 1, registers: [{channel: x, address: 200}]}
""")
    also = "right only if both read one instrument (two instruments cannot share an address on one bus)"
    assert [str(w)[len(str(path)) + 1:] for w in load_config(path, env={}).warnings] == [
        f"10:32: devices.cod-status.slave: warning: slave 1 on bus 'rs' is also device 'cod': {also}",
        f"14:28: devices.flow2.slave: warning: slave 1 on bus 'lan' is also device 'flow': {also}",
        f"15:27: devices.third.slave: warning: slave 1 on bus 'rs' is also device 'cod': {also}",
    ]


def test_intervals_a_bus_certainly_cannot_keep_are_warnings(tmp_path: Path) -> None:
    """A silent device holds its bus timeout × (retries + 1); on RTU the polls of all devices need their
    wire time (frames of 8 and 5 + 2 × registers bytes at the line's character time, a 3.5-character gap
    after each): warned only where the interval is certainly missed. At 9600 8N1 one read of 2 registers
    is 25 ms; bus rs needs 2 × 25 + 27 + 25 ms per 100 ms, bus fast (19200 baud) half of that."""
    path = write(tmp_path, """station: {id: ST01, type: outfall}
storage: {path: b.db}
mqtt: {url: "mqtt://127.0.0.1:1883"}
buses:
  rs: {type: rtu, port: /dev/ttyUSB0, timeout: 0.04, retries: 0}
  fast: {type: rtu, port: /dev/ttyUSB1, baudrate: 19200, timeout: 0.04, retries: 0}
  slow: {type: rtu, port: /dev/ttyS1, baudrate: 1200, parity: E, timeout: 0.1, retries: 0}
  lan: {type: tcp, host: 192.168.1.50, timeout: 1, retries: 2}
devices:
  a: {bus: rs, slave: 1, interval: 0.1, registers: TWO_READS}
  b: {bus: rs, slave: 2, interval: 0.1, registers: ONE_READ_3}
  c: {bus: rs, slave: 3, interval: 0.1, registers: ONE_READ_2}
  a2: {bus: fast, slave: 1, interval: 0.1, registers: TWO_READS}
  b2: {bus: fast, slave: 2, interval: 0.1, registers: ONE_READ_3}
  c2: {bus: fast, slave: 3, interval: 0.1, registers: ONE_READ_2}
  ph: {bus: slow, slave: 1, interval: 0.2, registers: ONE_READ_2}
  flow: {bus: lan, slave: 1, interval: 3, profile: flow-meter}
  dust: {bus: lan, slave: 2, interval: 2.5, profile: flow-meter}
""".replace("TWO_READS", "[{channel: v, address: 0, type: float32}, {channel: w, address: 38, type: float32}]")
                           .replace("ONE_READ_3", "[{channel: v, address: 0, type: float32}, {channel: s, address: 2}]")
                           .replace("ONE_READ_2", "[{channel: v, address: 0, type: float32}]"))
    read = "(8 + 5 + 2 × registers) bytes × {} bits / {} baud + 2 × 3.5 characters of silence"
    assert [str(w)[len(str(path)) + 1:] for w in load_config(path, env={}).warnings] == [
        f"10:36: devices.a.interval: warning: the polls on bus 'rs' need ~102 ms of wire time per 100 ms (each "
        f"read: {read.format(10, 9600)}; the 3 devices of the bus at their intervals): the bus cannot keep these "
        "intervals (lengthen this one, the largest share, or raise the baud rate)",
        f"16:39: devices.ph.interval: warning: the polls on bus 'slow' need ~220 ms of wire time per 200 ms (each "
        f"read: {read.format(11, 1200)}; this device alone): the bus cannot keep this interval (lengthen it, or "
        "raise the baud rate)",
        "18:40: devices.dust.interval: warning: a device that stops answering holds bus 'lan' for timeout × "
        "(retries + 1) = 1 s × 3 = 3 s at its first polls (then one try), longer than this interval: polls are "
        "missed whenever a device of the bus falls silent (lower timeout or retries, or lengthen the interval)",
    ]
    # As long as the interval exactly: not certainly missed. Half a second more per try: missed.
    calm = path.read_text().replace("interval: 2.5", "interval: 3")
    assert load_config(write(tmp_path, calm), env={}).warnings[2:] == []
    config = load_config(write(tmp_path, calm.replace("timeout: 1,", "timeout: 1.5,")), env={})
    assert [w.path for w in config.warnings[2:]] == ["devices.flow.interval", "devices.dust.interval"]


def test_a_serial_port_must_be_an_absolute_device_path(tmp_path: Path) -> None:
    """`port: 502` on an rtu bus is a Modbus TCP gateway taken for a serial line; a relative path would be
    looked for in the service's working directory. Both are refused, by the schema too."""
    import jsonschema
    import yaml

    validator = jsonschema.Draft202012Validator(json_schema())
    tcp_hint = ("'{}' is not a serial device: a Modbus TCP gateway is a bus of type: tcp with host: and port: "
                "(e.g. type: tcp, host: 192.168.1.50, port: 502)")
    for port, message in (
        ("502", tcp_hint.format("502")),
        ("192.168.1.50:502", tcp_hint.format("192.168.1.50:502")),
        ("ttyUSB0", "'ttyUSB0' is not an absolute path: a serial port is a device such as /dev/ttyUSB0 or "
                    "/dev/serial/by-id/... (did you mean /dev/ttyUSB0?)"),
        ("serial/ttyS0", "'serial/ttyS0' is not an absolute path: a serial port is a device such as /dev/ttyUSB0 "
                         "or /dev/serial/by-id/..."),
    ):
        text = GOOD.replace("port: /dev/ttyUSB0", f"port: {port}")
        assert single_problem(tmp_path, text) == f"9:30: buses.rs485-1.port: {message}"
        assert list(validator.iter_errors(yaml.safe_load(text))), f"the schema lets port: {port} through"
    text = GOOD.replace("{type: rtu, port: /dev/ttyUSB0}", "{type: serial, port: '502'}").replace(
        "    slave: 1\n    profile: cod-analyzer\n", "    driver: pms5003\n")
    assert single_problem(tmp_path, text) == ("9:33: buses.rs485-1.port: '502' is not an absolute path: a serial "
                                              "port is a device such as /dev/ttyUSB0 or /dev/serial/by-id/...")
    # `status` reads no bus: an unset variable there is no problem to it (check-config says it is unset).
    text = GOOD.replace("port: /dev/ttyUSB0", 'port: "${SERIAL_PORT}"')
    assert parse_config(text, env={}, for_status=True).buses["rs485-1"].port
    assert single_problem(tmp_path, text) == "9:30: buses.rs485-1.port: environment variable SERIAL_PORT is not set"


def test_a_serial_port_missing_on_this_machine_is_a_warning_of_check_config_only(tmp_path: Path) -> None:
    """check-config may run on a laptop: a port that is not there is a warning (the port is not opened),
    and only where files are checked (`run` finds out when it opens the port)."""
    from harness import run_cli

    text = port_here(tmp_path, GOOD).replace("  sim:\n", "  pm:\n    bus: uart\n    driver: pms5003\n  sim:\n")
    text = text.replace("buses:\n", f"buses:\n  uart: {{type: serial, port: {tmp_path / 'ttyAMA9'}}}\n")
    path = write(tmp_path, text)
    warning = (f"{path}:9:30: buses.uart.port: warning: {tmp_path / 'ttyAMA9'} does not exist on this machine (fine "
               "if you are not on the gateway; on it, is the adapter plugged in? see ls /dev/serial/by-id/)")
    assert [str(w) for w in load_config(path, env={}, check_files=True).warnings] == [warning]
    assert load_config(path, env={}).warnings == []
    result = run_cli("check-config", str(path))
    assert (result.returncode, result.stderr) == (0, warning + "\n")
    (tmp_path / "ttyAMA9").touch()
    assert load_config(path, env={}, check_files=True).warnings == []


def test_a_register_number_of_a_manual_given_as_address_is_a_warning(tmp_path: Path) -> None:
    """SPEC's address is the 0-based protocol address: register 40001 is address 0 of holding. A decimal
    address in 30001..39999 or 40001..49999 of a register table is warned about, with the address and
    table it likely means; 400001 and above are errors, which say the same."""
    path = write(tmp_path, GOOD.replace("    profile: cod-analyzer\n", """\
    registers:
      - {channel: a, address: 40001, type: float32}
      - {channel: b, address: 30005, type: float32}
      - {channel: c, address: 30101, table: input}
      - {channel: d, address: 49999, table: input}
      - {channel: e, address: 0x9C51}
      - {channel: f, address: 40010, table: coil}
      - {channel: g, address: 40000}
"""))
    means = "looks like a register number as manuals count them (from 1): address is the 0-based protocol address"
    assert [str(w)[len(str(path)) + 1:] for w in load_config(path, env={}).warnings] == [
        f"20:31: devices.cod.registers.0.address: warning: 40001 {means}, and register 40001 is address 0 of "
        "holding (address: 0)",
        f"21:31: devices.cod.registers.1.address: warning: 30005 {means}, and register 30005 is address 4 of "
        "input (address: 4, table: input)",
        f"22:31: devices.cod.registers.2.address: warning: 30101 {means}, and register 30101 is address 100 of "
        "input (address: 100)",
        f"23:31: devices.cod.registers.3.address: warning: 49999 {means}, and register 49999 is address 9998 of "
        "holding (address: 9998, table: holding)",
    ]
    text = GOOD.replace("    profile: cod-analyzer\n", "    registers: [{channel: a, address: 400101}]\n")
    assert single_problem(tmp_path, text) == ("19:39: devices.cod.registers.0.address: 400101 is outside 0..65535 "
                                              "(0-based protocol address: register 400101 is address 100 of holding)")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_examples_get_no_wire_warnings(path: Path) -> None:
    """The shipped examples keep their intervals, slaves, addresses and ports right (a port missing on the
    machine that checks them is the machine's matter: see the test above)."""
    warned = [w for w in load_config(path, env=EXAMPLE_ENV).warnings
              if w.path.endswith((".slave", ".interval", ".address", ".port"))]
    assert warned == []


HJ212_STATION = """station: {id: ST01, type: dust}
storage: {path: b.db}
mqtt: {url: "mqtt://127.0.0.1:1883"}
buses:
  lan: {type: tcp, host: 127.0.0.1}
hj212: {st: 39, pw: "123456", uplinks: [{host: 127.0.0.1, port: 9000}]}
devices:
"""


def test_a_pollutant_in_another_unit_than_the_hj212_code_tables_is_a_warning_when_hj212_is_spoken(
        tmp_path: Path) -> None:
    """HJ 212 packets carry no unit: a platform reads a34004 as ug/m3, w00000 as L/s, w01018 as mg/L.
    A dust monitor reporting mg/m3 would be read 1000 times too small. Units the table allows (TSP in
    mg/m3), spellings of the same unit (µg/m³, ℃) and units of no known kind (%RH) are no warning."""
    text = HJ212_STATION + """  dust:
    driver: simulated
    channels:
      a34004: {unit: mg/m3, mean: 0.04}
      a34002: {unit: "µg/m³", mean: 70}
      a34001: {unit: mg/m3, mean: 0.1}
      a01001: {unit: "℃"}
      a01002: {unit: "%RH"}
  flow:
    bus: lan
    slave: 1
    registers:
      - {channel: w00000, address: 0, type: float32, unit: m3/h}
      - {channel: w01018, address: 2, type: float32, unit: ug/L}
      - {channel: other, address: 4, type: float32, unit: mg/m3}
"""
    path = write(tmp_path, text)
    warnings = [(w.path, w.message) for w in load_config(path, env={}).warnings]
    assert [(p, m.split(":")[1].strip()) for p, m in warnings] == [
        ("devices.dust.channels.a34004.unit", "a platform would read these values as ug/m3, 1000 times too small; "
                                              "convert them (a register's scale) or use another channel code"),
        ("devices.flow.registers.0.unit", "a platform would read these values as L/s, 3.6 times too large; "
                                          "convert them (a register's scale) or use another channel code"),
        ("devices.flow.registers.1.unit", "a platform would read these values as mg/L, 1000 times too large; "
                                          "convert them (a register's scale) or use another channel code"),
    ]
    without_hj212 = text.replace('hj212: {st: 39, pw: "123456", uplinks: [{host: 127.0.0.1, port: 9000}]}\n', "")
    assert load_config(write(tmp_path, without_hj212), env={}).warnings == []


def test_one_pollutant_code_on_two_devices_is_a_warning_when_hj212_is_spoken(tmp_path: Path) -> None:
    """An inlet and an outlet COD analyzer both read w01018: in HJ 212 (MN = the station) a platform
    cannot tell them apart; JSON names the device, so without HJ 212 it is no warning."""
    text = HJ212_STATION + """  inlet: {bus: lan, slave: 1, profile: cod-analyzer}
  outlet: {bus: lan, slave: 2, profile: cod-analyzer}
  sim: {driver: simulated, channels: {c1: {}, c2: {}}}
"""
    path = write(tmp_path, text)
    warnings = [(w.path, w.message) for w in load_config(path, env={}).warnings]
    assert [p for p, _ in warnings] == ["devices.outlet"]
    assert "channel w01018 is also measured by device 'inlet'" in warnings[0][1]
    without_hj212 = text.replace('hj212: {st: 39, pw: "123456", uplinks: [{host: 127.0.0.1, port: 9000}]}\n', "")
    assert load_config(write(tmp_path, without_hj212), env={}).warnings == []


def test_a_timeout_of_more_than_an_hour_is_refused(tmp_path: Path) -> None:
    # `timeout: 1e26` (a slip of the keyboard) passed check-config, and then every poll failed with an
    # OverflowError logged as a "bad answer"; no instrument or platform answers after more than an hour.
    path = write(tmp_path, """station: {id: ST01, type: outfall}
storage: {path: b.db}
mqtt: {url: "mqtt://127.0.0.1:1883"}
buses:
  rs: {type: rtu, port: /dev/ttyUSB0, timeout: 1e26}
  lan: {type: tcp, host: 10.0.0.2, timeout: 3601}
  uart: {type: serial, port: /dev/ttyUSB1, timeout: 3600}
devices:
  a: {bus: rs, slave: 1, registers: [{channel: x, address: 0}]}
  b: {bus: lan, slave: 1, registers: [{channel: x, address: 0}]}
  pm: {bus: uart, driver: sds011, interval: 10}
hj212:
  st: 32
  pw: "123456"
  uplinks: [{host: 10.0.0.9, port: 9000, timeout: 1e9}]
""")
    problems = problems_of(path)
    keys = [p.split(": ", 2)[1] for p in problems]
    assert keys == ["buses.rs.timeout", "buses.lan.timeout", "hj212.uplinks.0.timeout"], problems
    assert all("must be at most 3600" in p for p in problems), problems


def test_an_interval_of_more_than_a_day_is_refused_where_it_is_written(tmp_path: Path) -> None:
    # `interval: 1e26` (a slip of the keyboard) passed check-config and the device was then never polled:
    # no reading, not even null/B, and nothing said why. A poll period longer than a day is refused like a
    # timeout longer than an hour; a day itself is accepted (a daily manual-lab entry, a slow counter).
    path = write(tmp_path, """station: {id: ST01, type: outfall}
storage: {path: b.db}
mqtt: {url: "mqtt://127.0.0.1:1883"}
devices:
  a: {driver: simulated, interval: 1e26, channels: {w01018: {mean: 1}}}
  b: {driver: simulated, interval: 86401, channels: {w01018: {mean: 1}}}
  c: {driver: simulated, interval: 86400, channels: {w01018: {mean: 1}}}
""")
    problems = problems_of(path)
    assert [p.split(": ", 2)[1] for p in problems] == ["devices.a.interval", "devices.b.interval"], problems
    assert all("must be at most 86400" in p for p in problems), problems
    assert problems[0].startswith(f"{path}:5:"), problems


def test_two_channel_codes_of_one_device_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    # `a34004` and `A34004` were taken as two channels of one device: two series for one pollutant in
    # the buffer, the payloads and the alarms, which HJ 212 platforms (which match codes without regard
    # to case in practice) merge or overwrite. An inline register whose code is a profile's in other
    # case was a new channel, not the override the technician meant. Refused, naming the first spelling.
    path = write(tmp_path, """station: {id: ST01, type: outfall}
storage: {path: b.db}
mqtt: {url: "mqtt://127.0.0.1:1883"}
buses:
  rs: {type: rtu, port: /dev/ttyUSB0}
devices:
  sim:
    driver: simulated
    channels: {a34004: {mean: 1}, A34004: {mean: 2}}
  dust:
    bus: rs
    slave: 1
    registers:
      - {channel: a34002, address: 0}
      - {channel: A34002, address: 2}
  cod:
    bus: rs
    slave: 2
    profile: cod-analyzer
    registers: [{channel: W01018, address: 0x0042, type: float32, order: DCBA, range: [0, 500]}]
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    problems = info.value.problems
    assert [(p.line, p.path) for p in problems] == [
        (9, "devices.sim.channels.A34004"), (15, "devices.dust.registers.1.channel"),
        (20, "devices.cod.registers.0.channel")], [str(p) for p in problems]
    assert "'A34004' differs from channel 'a34004' only in case" in problems[0].message, problems[0].message
    assert "'A34002' differs from channel 'a34002' only in case" in problems[1].message, problems[1].message
    assert "profile 'cod-analyzer'" in problems[2].message and "'w01018'" in problems[2].message, problems[2].message


def test_one_pollutant_code_in_two_cases_on_two_devices_is_a_warning_when_hj212_is_spoken(tmp_path: Path) -> None:
    path = write(tmp_path, """station: {id: ST01, type: outfall}
storage: {path: b.db}
mqtt: {url: "mqtt://127.0.0.1:1883", payload: hj212}
hj212: {st: 39, pw: "123456"}
devices:
  up: {driver: simulated, channels: {a34004: {mean: 1, unit: ug/m3}}}
  down: {driver: simulated, channels: {A34004: {mean: 1, unit: ug/m3}}}
""")
    warnings = [w for w in load_config(path, env={}).warnings if "also measured" in w.message]
    assert [(w.path, "channel A34004 is also measured by device 'up' (as a34004)" in w.message)
            for w in warnings] == [("devices.down", True)], [str(w) for w in warnings]


def test_two_devices_of_one_serial_driver_on_one_serial_bus_are_refused(tmp_path: Path) -> None:
    # Two hj212 analyzers (or two dust sensors) on one serial bus passed check-config; `run` then logged a
    # warning and both devices stored every packet on the line: each analyzer's values under both device
    # ids. A serial frame names no instrument the agent could tell apart (RS-232 is point to point, and two
    # instruments that talk unasked on one RS-485 pair collide), so it is refused where the second
    # device names the bus. Devices of different drivers on one line are left alone (their frames differ).
    path = write(tmp_path, f"""station: {{id: ST01, type: outfall}}
storage: {{path: b.db}}
mqtt: {{url: "mqtt://127.0.0.1:1883"}}
buses:
  rs: {{type: serial, port: {tmp_path}}}
  uart: {{type: serial, port: {tmp_path}/x}}
devices:
  a: {{bus: rs, driver: hj212}}
  b: {{bus: rs, driver: hj212}}
  pm: {{bus: rs, driver: pms5003}}
  d1: {{bus: uart, driver: sds011}}
  d2: {{bus: uart, driver: sds011}}
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    problems = info.value.problems
    assert [(p.line, p.path) for p in problems] == [(9, "devices.b.bus"), (12, "devices.d2.bus")], \
        [str(p) for p in problems]
    assert "device 'a' is an hj212 instrument on serial bus 'rs' too" in problems[0].message, problems[0].message
    assert "its own serial bus" in problems[0].message, problems[0].message


def with_tcp_bus_and_uplinks(tmp_path: Path, bus_host: str, uplink_hosts: list[str]) -> str:
    """GOOD with a Modbus TCP bus `lan` at `bus_host` (and a device on it) and HJ 212 uplinks to `uplink_hosts`."""
    uplinks = "".join(f'    - {{host: "{host}", port: 9000}}\n' for host in uplink_hosts)
    text = port_here(tmp_path, GOOD) + "  plc: {bus: lan, slave: 1, profile: cod-analyzer}\n"
    text += 'hj212:\n  st: 32\n  pw: "123456"\n  uplinks:\n' + uplinks
    return text.replace("buses:\n", f'buses:\n  lan: {{type: tcp, host: "{bus_host}", port: 502}}\n')


def test_a_host_that_no_connection_can_reach_is_a_problem_at_its_line(tmp_path: Path) -> None:
    """`host:` of a Modbus TCP bus or an HJ 212 uplink, and the host of the broker url, took any text:
    an address pasted with its port (`192.168.1.50:502`), a URL from a browser, a space typed in it.
    check-config said OK; on site the agent never reached the instrument or platform (every poll null,
    flag B) and the technician had left. Names, IPv4 and IPv6 addresses pass, as does `${NAME}`; a
    user and password written in a host are refused without being shown."""
    text = with_tcp_bus_and_uplinks(tmp_path, "192.168.1.50:502", [
        "tcp://10.20.0.6", "platform.example", "fe80::1", "${PLATFORM}", "admin:Hunter2@10.20.0.7"])
    text = text.replace("url: mqtt://127.0.0.1:1883", "url: mqtt://broker example:1883")
    path = write(tmp_path, text)
    assert [p.split(": ", 1)[1] for p in problems_of(path, env={"PLATFORM": "10.20.0.5"})] == [
        "mqtt.url: the url's host 'broker example' is not a host name or IP address (letters, digits, '-', "
        "'_' and '.'; an IPv6 address in [ ])",
        "buses.lan.host: give the port in port:, not in host (e.g. host: 192.168.1.50, port: 502)",
        "hj212.uplinks.0.host: a host name or IP address, not a URL (e.g. host: 192.168.1.50; the port goes "
        "in port:)",
        "hj212.uplinks.4.host: a host name or IP address only: no user or password (e.g. host: 192.168.1.50)",
    ]
    assert "Hunter2" not in "".join(problems_of(path, env={"PLATFORM": "x"})), "what comes before '@' may be a password"
    lines = text.splitlines()
    assert [p.split(": ", 1)[0].split(":", 1)[1] for p in problems_of(path, env={"PLATFORM": "x"})] == [
        f"{i}:{lines[i - 1].index(v) + 1}" for i, v in (
            (next(n for n, line in enumerate(lines, 1) if "url:" in line), "mqtt://broker"),
            (next(n for n, line in enumerate(lines, 1) if "lan:" in line), '"192.168'),
            (next(n for n, line in enumerate(lines, 1) if "tcp://" in line), '"tcp://'),
            (next(n for n, line in enumerate(lines, 1) if "Hunter2" in line), '"admin'))]


def test_an_ipv6_host_written_in_brackets_is_the_address_the_agent_connects_to(tmp_path: Path) -> None:
    """`[fe80::1]` (an IPv6 address as URLs write it) passed check-config for a bus or an uplink, then every
    connection failed: a socket takes the address without brackets. It is taken without them."""
    text = with_tcp_bus_and_uplinks(tmp_path, "[::1]", ["[fe80::1]"])
    config = load_config(write(tmp_path, text), env={})
    assert (config.buses["lan"].host, config.hj212.uplinks[0].host) == ("::1", "fe80::1")


def test_a_console_listen_given_as_a_url_is_told_to_drop_the_scheme(tmp_path: Path) -> None:
    """`console.listen: "http://0.0.0.0:8080"` (the address as a browser shows it) was answered "put an
    IPv6 address in brackets": its two ':' were taken for an IPv6 address, and the hint led nowhere."""
    text = port_here(tmp_path, GOOD) + 'console:\n  listen: "http://0.0.0.0:8080"\n  password_file: x\n'
    problems = [p for p in problems_of(write(tmp_path, text)) if "console.listen" in p]
    assert [p.split("console.listen: ", 1)[1] for p in problems] == [
        "give HOST:PORT, not a URL (e.g. 0.0.0.0:8080 without http://)"], problems


def test_a_variable_set_but_empty_is_a_warning_at_the_value(tmp_path: Path) -> None:
    """`${NAME}` unset is an error (SPEC §2); set but empty (`MQTT_PASS=` in the service's environment
    file, the value forgotten) it was taken silently: `path: ${DATA_DIR}/buffer.db` became /buffer.db,
    `password: ${MQTT_PASS}` an empty password the broker refuses, and check-config said OK. It is
    a warning (the file stays valid: an empty value may be meant), at the value, naming the variable."""
    credentials = "  url: mqtt://127.0.0.1:1883\n  username: ${MQTT_USER}\n  password: ${MQTT_PASS}"
    text = port_here(tmp_path, GOOD).replace("  path: ./data/buffer.db", "  path: ${DATA_DIR}/buffer.db").replace(
        "  url: mqtt://127.0.0.1:1883", credentials)
    path = write(tmp_path, text)
    config = load_config(path, env={"DATA_DIR": "", "MQTT_USER": "station", "MQTT_PASS": ""})
    assert config.storage.path == Path("/buffer.db")
    assert [str(w) for w in config.warnings if "environment variable" in str(w)] == [
        f"{path}:5:9: storage.path: warning: environment variable DATA_DIR is set but empty",
        f"{path}:9:13: mqtt.password: warning: environment variable MQTT_PASS is set but empty",
    ]


def test_a_byte_that_is_not_utf8_is_located_in_characters_as_every_other_problem(tmp_path: Path) -> None:
    """A line pasted from a GBK source (Windows Notepad's "ANSI" on a Chinese system) into a UTF-8 file:
    the column of the first byte that is not UTF-8 was counted in bytes, so on a line with Chinese text
    before it (3 bytes a character) it pointed past it; in a file that starts with a BOM (Notepad's
    "UTF-8") every position was 3 bytes early, at the start of a line on the line before. Columns count
    characters, as in every other problem (and as an editor shows them)."""
    gbk = "排口".encode("gbk")
    path = tmp_path / "station.yaml"
    path.write_bytes(b'station:\n  name: "' + "汾河".encode() + gbk + b'"\n')
    assert problems_of(path) == [f"{path}:2:12: (file): the file is not UTF-8 text (save it as UTF-8)"]
    path.write_bytes(b'\xef\xbb\xbfstation: {name: "' + gbk + b'"}\n')
    assert problems_of(path) == [f"{path}:1:18: (file): the file is not UTF-8 text (save it as UTF-8)"]
    path.write_bytes(b'\xef\xbb\xbfstation:\n  id: S1\n' + gbk + b': x\n')
    assert problems_of(path) == [f"{path}:3:1: (file): the file is not UTF-8 text (save it as UTF-8)"]


def test_true_or_false_written_as_text_is_told_apart_from_true_or_false(tmp_path: Path) -> None:
    """`hour: "true"`, or `hour: ${AGG_HOUR}` with AGG_HOUR=true (a substituted value is text where a
    yes/no value is expected), was refused as "expected true or false (got 'true')": the technician
    had written true."""
    said = "expected true or false (got the text 'true': write true or false without quotes or ${NAME})"
    for written, env in (('"true"', {}), ("${AGG_HOUR}", {"AGG_HOUR": "true"})):
        text = port_here(tmp_path, GOOD) + f"aggregate:\n  hour: {written}\n"
        assert single_problem(tmp_path, text, env) == f"21:9: aggregate.hour: {said}"
    text = port_here(tmp_path, GOOD) + "aggregate:\n  hour: maybe\n"
    assert single_problem(tmp_path, text) == "21:9: aggregate.hour: expected true or false (got 'maybe')"
