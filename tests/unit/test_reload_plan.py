"""What a reload (SIGHUP) does with the running station, as pure decisions on two loaded configs:
which bus pollers it keeps, restarts, stops and starts; which edits reconnect to the broker; what it
says of storage settings that wait for a restart. The agent doing it is in
tests/integration/test_reload.py."""

from __future__ import annotations

from pathlib import Path

from agent.config import Config, load_config
from agent.pollerset import plan_reload, poller_specs
from agent.runtime import broker_settings, storage_changes

STATION = """station: {id: T1, name: t, type: other, timezone: Asia/Shanghai}
storage: {path: buffer.db}
mqtt: {url: "mqtt://127.0.0.1:1883"}
devices:
  sim: {driver: simulated, interval: 1, channels: {a: {mean: 1}}}
"""


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "station.yaml"
    path.write_text(text)
    return load_config(path, env={})


def test_a_reload_keeps_the_pollers_whose_bus_and_devices_are_unchanged(tmp_path):
    """`pollerset.plan_reload`: a poller is restarted only when its bus's settings or devices changed."""
    base = ("station: {id: T1, name: t, type: other, timezone: Asia/Shanghai}\n"
            "storage: {path: buffer.db}\nmqtt: {url: 'mqtt://127.0.0.1:1883'}\nbuses:\n"
            "  line: {type: rtu, port: /dev/ttyUSB7, timeout: 0.2}\n  uart: {type: serial, port: /dev/ttyAMA7}\n"
            "devices:\n  pm: {bus: uart, driver: sds011, interval: 5}\n")

    def specs(devices: str):
        return poller_specs(load(tmp_path, base + devices))

    old = specs("  cod: {bus: line, slave: 1, interval: 5, profile: cod-analyzer}\n")
    new = specs("  cod: {bus: line, slave: 1, interval: 6, profile: cod-analyzer}\n"
                "  sim: {driver: simulated, interval: 1, channels: {a: {mean: 1}}}\n")
    plan = plan_reload(old, new)
    assert (plan.kept, plan.restarted, plan.started, plan.stopped) == (["uart"], ["line"], ["sim:sim"], [])
    assert plan.summary() == "restarted: line; started: sim:sim; unchanged, kept polling: uart"
    assert plan_reload(new, old).stopped == ["sim:sim"]



def test_an_hj212_edit_does_not_reconnect_a_station_that_publishes_json(tmp_path):
    """The `hj212` section (PW, ST, uplinks) is the MQTT payload's only with `payload: hj212`: removing it
    or changing its password used to drop the broker connection and flap the retained status offline."""
    plain = broker_settings(load(tmp_path, STATION))
    with_hj212 = broker_settings(load(tmp_path, STATION + "hj212: {st: 32, pw: '123456'}\n"))
    assert with_hj212 == plain
    as_hj212 = STATION.replace('"mqtt://127.0.0.1:1883"}', '"mqtt://127.0.0.1:1883", payload: hj212}')
    first = broker_settings(load(tmp_path, as_hj212 + "hj212: {st: 32, pw: '123456'}\n"))
    second = broker_settings(load(tmp_path, as_hj212 + "hj212: {st: 32, pw: '654321'}\n"))
    assert first != second, "with payload: hj212 the packets carry PW: a new one reconnects"


def test_storage_edits_are_named_with_both_values(tmp_path):
    """Each edited storage setting is named with both values: the limits a reload applies at once, and
    the others (`sync`), read at start only, with the value in the file and the one in force."""
    running = load(tmp_path, STATION.replace("storage: {path: buffer.db}", "storage: {path: buffer.db, max_mb: 256}"))
    edited = load(tmp_path, STATION.replace("storage: {path: buffer.db}",
                                            "storage: {path: other.db, max_mb: 512.5, sync: normal}"))
    assert storage_changes(running.storage, edited.storage) == (
        ["storage.max_mb: 512.5 (was 256)"],
        ["storage.sync is normal in the file but full in force: it takes effect at the next restart "
         "(systemctl restart edge-agent)"])
