"""`edge-agent tail` against real mosquitto brokers: a broker that refuses its login (a password file),
and the station's failover `urls` mixing mqtt:// and mqtts:// (TLS is each URL's, as for `run`)."""

from __future__ import annotations

import socket
import subprocess
import threading

import paho.mqtt.client as mqtt
from harness import Broker, free_port, silent_listener, sim_config, start_tail, wait_for, write_config
from paho.mqtt.enums import CallbackAPIVersion
from test_tls_and_limits import make_pki

from agent.tail import MAX_MESSAGE_BYTES, SHOWN_BYTES


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def attempts(broker: Broker) -> int:
    """Connections the broker received (its log)."""
    return broker.log.read_text().count("New connection from") if broker.log.exists() else 0


def test_a_login_the_broker_refuses_is_said_once_not_at_every_attempt(tmp_path):
    # A wrong password: tail printed "# broker refused: Not authorized" and "# disconnected (Unspecified
    # error); reconnecting ..." at every attempt, for as long as it ran. It now says once why, with what
    # to check, and tries again without repeating it; a cause that changes is said again.
    broker = Broker(tmp_path / "broker", passwords={"station": "right-one"}).start()
    pwfile = tmp_path / "mqtt.pass"
    pwfile.write_text("wrong-one\n")
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, mqtt={
        "username": "station", "password_file": str(pwfile)}))
    out = tmp_path / "tail.out"
    proc = start_tail(cfg, out)
    try:
        wait_for(lambda: attempts(broker) >= 3, 30, "three attempts of tail")
        lines = out.read_text().splitlines()
        assert lines == [f"# broker 127.0.0.1:{broker.port} refused the connection: Not authorized (check "
                         "mqtt.username and mqtt.password / password_file); retrying"], lines
        broker.stop()
        wait_for(lambda: len(out.read_text().splitlines()) >= 2, 30, "the next cause")
        assert out.read_text().splitlines()[1] == (f"# cannot connect to 127.0.0.1:{broker.port} (Connection "
                                                   "refused); retrying"), out.read_text()
    finally:
        stop(proc)
        broker.stop()


def test_failover_urls_that_mix_mqtt_and_mqtts_each_get_their_own_tls(tmp_path):
    # tail set TLS up once, by the first URL: a plain broker after an mqtts:// one was spoken to in TLS
    # ("Connection reset by peer"), a TLS broker after an mqtt:// one in plain text, and it never
    # subscribed. Each attempt now takes its URL's scheme, as `run` does. (mqtts:// without `tls:` uses
    # the system's CAs: here SSL_CERT_FILE names the test CA.)
    pki = make_pki(tmp_path / "pki")
    plain = Broker(tmp_path / "plain").start()
    secure = Broker(tmp_path / "secure", tls=pki, extra="require_certificate false").start()
    env = {"SSL_CERT_FILE": pki["ca"], "PATH": "/usr/bin:/bin"}
    procs = []
    try:
        for name, urls, target in (
                ("tls-first", [f"mqtts://127.0.0.1:{free_port()}", plain.url], plain),
                ("plain-first", [f"mqtt://127.0.0.1:{free_port()}", secure.url], secure)):
            config = sim_config(tmp_path, plain)
            config["mqtt"].pop("url")
            config["mqtt"]["urls"] = urls
            cfg = write_config(tmp_path / f"{name}.yaml", config)
            out = tmp_path / f"{name}.out"
            procs.append(start_tail(cfg, out, env=env))
            wait_for(lambda out=out: "# subscribed" in out.read_text(), 30, f"tail ({name}) subscribed")
            assert f"# subscribed to env/TEST0001/# on 127.0.0.1:{target.port}" in out.read_text().splitlines()
    finally:
        for proc in procs:
            stop(proc)
        plain.stop()
        secure.stop()


def test_a_broker_that_takes_the_connection_and_never_answers_is_said_once_and_the_next_url_tried(tmp_path):
    # A port that accepts TCP and never sends a CONNACK (a frozen broker, a wrong service): tail waited on
    # it for ever, saying nothing, and never tried the station's next URL.
    with silent_listener() as (port, _):
        broker = Broker(tmp_path / "broker").start()
        config = sim_config(tmp_path, broker)
        config["mqtt"].pop("url")
        config["mqtt"]["urls"] = [f"mqtt://127.0.0.1:{port}", broker.url]
        out = tmp_path / "tail.out"
        proc = start_tail(write_config(tmp_path / "station.yaml", config), out)
        try:
            wait_for(lambda: "# subscribed" in out.read_text(), 40, "tail subscribed on the next URL")
            assert out.read_text().splitlines() == [
                f"# broker 127.0.0.1:{port} does not answer (no CONNACK within 10 s); retrying",
                f"# subscribed to env/TEST0001/# on 127.0.0.1:{broker.port}"], out.read_text()
        finally:
            stop(proc)
            broker.stop()


def test_a_broker_that_drops_tail_once_subscribed_is_retried_with_backoff(tmp_path):
    # A broker that accepts the connection and closes it at the SUBSCRIBE (an ACL that disconnects on a
    # topic denied, as AWS IoT or EMQX can be set to): tail reconnected at once, again and again, as fast
    # as the broker answered, printing "# subscribed" and "# disconnected" at every turn. paho's own loop,
    # which tail used before, waited at least a second between attempts. A connection that did not last
    # is now followed by the same wait as a failed attempt.
    import io

    from agent.tail import tail

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def connack_then_close_at_subscribe() -> None:
        while True:
            try:
                conn = listener.accept()[0]
            except OSError:
                return
            accepted.append(conn)
            conn.recv(4096)  # CONNECT
            conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
            conn.recv(4096)  # SUBSCRIBE
            conn.close()

    class CountedWaits(threading.Event):
        waits = 0

        def wait(self, timeout=None):
            CountedWaits.waits += 1
            return super().wait(timeout)

    threading.Thread(target=connack_then_close_at_subscribe, daemon=True).start()
    stop_tail = CountedWaits()
    out = io.StringIO()
    runner = threading.Thread(target=tail, args=(f"mqtt://127.0.0.1:{listener.getsockname()[1]}", "env/X"),
                              kwargs={"out": out, "stop": stop_tail}, daemon=True)
    runner.start()
    try:
        wait_for(lambda: len(accepted) >= 3, 30, "three connections")
        assert CountedWaits.waits > 0, f"no wait between {len(accepted)} connections:\n{out.getvalue()[:2000]}"
    finally:
        stop_tail.set()
        runner.join(10)
        listener.close()
        for sock in accepted:
            sock.close()


def test_a_huge_message_on_the_stations_topics_is_shown_cut_and_tail_goes_on(tmp_path, broker):
    # A 100 MB payload of NUL bytes published under the station's topics (mosquitto takes up to 256 MB by
    # default): tail decoded it, escaped it byte by byte and printed it whole, 400 MB of `\x00` on the
    # technician's terminal after minutes, past 7 GB of memory on the gateway meanwhile. It now shows its
    # size and its first bytes at once, and goes on with the next message.
    cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker))
    out = tmp_path / "tail.out"
    proc = start_tail(cfg, out)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2)
    try:
        wait_for(lambda: "# subscribed" in out.read_text(), 30, "tail subscribed")
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        size = 5 * MAX_MESSAGE_BYTES
        publisher.publish("env/TEST0001/data", bytes(size), qos=1).wait_for_publish(30)
        reading = b'{"readings":[{"seq":1,"device":"cod","channel":"w01018","ts":"T","value":2,"flag":"N"}]}'
        publisher.publish("env/TEST0001/data", reading, qos=1).wait_for_publish(30)
        wait_for(lambda: "data   #1 " in out.read_text(errors="replace"), 15, "the next message printed")
        assert out.read_text().splitlines()[1:] == [
            f"data   TOO LARGE: {size} bytes, not decoded; the first {SHOWN_BYTES} shown ({size - SHOWN_BYTES} cut): "
            f"{bytes(SHOWN_BYTES)!r}",
            "data   #1 cod.w01018 T 2  N"]
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        stop(proc)
