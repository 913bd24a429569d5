"""The client certificate's life as an operator of many gateways lives it, with real certificates (openssl)
and a real mosquitto that demands them: expiry seen before and when it happens, renewed files taken up
without a restart, and each kind of unusable TLS setup said in one line that names the file and why."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from harness import (
    AgentProcess,
    Broker,
    Collector,
    as_another_user,
    db_last_seq,
    run_cli,
    secret,
    sim_config,
    wait_for,
    write_config,
)
from test_tls_and_limits import make_pki

from agent.model import parse_iso_utc_ms
from agent.tlsfiles import TlsFilesError, tls_context


def openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)


def client_cert(d: Path, name: str, *, days: int, ca: str = "ca") -> tuple[Path, Path]:
    """A client certificate and its key signed by `ca` (ca.pem, ca.key in `d`), valid for `days` from
    now (negative: expired that long ago... as far as openssl lets: -1 gives one that expired at once)."""
    openssl(d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}")
    openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", str(days), "-extfile", "client.ext")
    return d / f"{name}.pem", d / f"{name}.key"


def replace_atomically(target: Path, source: Path) -> None:
    """What renewal tooling does: write beside, then rename over the file in use."""
    tmp = target.with_name(target.name + ".new")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


def broker_status(config: Path) -> dict:
    result = run_cli("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["broker"]


def test_an_expired_client_certificate_is_said_and_its_renewal_is_taken_up_without_a_restart(tmp_path):
    """The broker refuses the expired certificate: the log says so (which file, when it expired), and so
    does `status`; the operator's tooling renames the renewed files over the old ones, and delivery
    resumes from seq 1 at the next attempt: no restart, no SIGHUP."""
    pki = make_pki(tmp_path / "pki")
    d = tmp_path / "pki"
    expired, expired_key = client_cert(d, "expired", days=-1)
    cert, key = d / "station.pem", d / "station.key"  # the paths in the config, as tooling keeps them
    replace_atomically(cert, expired)
    replace_atomically(key, expired_key)
    broker = Broker(tmp_path / "broker", tls=pki).start()
    config = sim_config(tmp_path, broker, channels=2, interval=0.2, mqtt={
        "reconnect_max": 1, "shutdown_grace": 1, "tls": {"ca": pki["ca"], "cert": str(cert), "key": str(key)}})
    cfg = write_config(tmp_path / "station.yaml", config)
    collector = Collector(broker, "env/#", tls=pki)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: f"the broker refused the client certificate mqtt.tls.cert ({cert}): it expired at"
                 in agent.log(), 20, "the refusal named, with the file and its expiry")
        assert f"the client certificate mqtt.tls.cert ({cert}) expired at" in agent.log()
        wait_for(lambda: db_last_seq(tmp_path / "buffer.db") >= 10, 20, "readings buffered meanwhile")
        wait_for(lambda: "expired at" in (broker_status(cfg).get("error") or ""), 10, "status says why")
        status = broker_status(cfg)
        assert parse_iso_utc_ms(status["cert_expires"]) <= time.time() * 1000, status
        text = run_cli("status", "-c", str(cfg)).stdout
        assert "client certificate EXPIRED at" in text, text
        assert not collector.reading_seqs()

        renewed, renewed_key = client_cert(d, "renewed", days=365)
        replace_atomically(key, renewed_key)
        replace_atomically(cert, renewed)
        wait_for(lambda: collector.reading_seqs() and min(collector.reading_seqs()) == 1, 20,
                 "delivery from seq 1 with the renewed files, without a restart")
        wait_for(lambda: parse_iso_utc_ms(broker_status(cfg)["cert_expires"]) > (time.time() + 300 * 86400) * 1000,
                 10, "status shows the renewed certificate's expiry")
        assert "expires" in run_cli("status", "-c", str(cfg)).stdout
    finally:
        assert agent.stop() == 0
        collector.close()
        broker.stop()
    assert secret(key.read_text().splitlines()[1]) not in agent.log(), "no key material in any log line"


def test_sighup_after_a_renewal_connects_again_with_the_renewed_certificate(tmp_path):
    """Connected with the old certificate, the renewed files replaced in place, `systemctl reload`: the
    agent connects again with them at once (the operator sees there and then that the broker takes them,
    and may revoke the old one), the retained status says the new expiry, no reading is lost. A reload
    while the renewal is half done (the certificate replaced, not yet its key) says so and keeps the
    connection. The certificate about to expire is warned of once, not at every reconnection."""
    pki = make_pki(tmp_path / "pki")  # the client certificate expires in 2 days
    d = tmp_path / "pki"
    broker = Broker(tmp_path / "broker", tls=pki, extra="use_identity_as_username true").start()
    config = sim_config(tmp_path, broker, channels=2, interval=0.2, mqtt={
        "reconnect_max": 1, "tls": {"ca": pki["ca"], "cert": pki["client_cert"], "key": pki["client_key"]}})
    cfg = write_config(tmp_path / "station.yaml", config)
    collector = Collector(broker, "env/#", tls=pki)
    agent = AgentProcess(cfg)

    def retained_expiry() -> str | None:
        online = [m for m in collector.json_messages("/status") if m.get("state") == "online"]
        return online[-1].get("cert_expires") if online else None

    try:
        wait_for(lambda: collector.reading_seqs(), 20, "delivery with the first certificate")
        warning = f"the client certificate mqtt.tls.cert ({pki['client_cert']}) expires at"
        assert agent.log().count(warning) == 1, agent.log()
        first = retained_expiry()
        assert first and parse_iso_utc_ms(first) < (time.time() + 3 * 86400) * 1000, first
        broker.stop()  # a reconnection: the warning is not said again
        broker.start()
        wait_for(lambda: agent.log().count("connected to") >= 2, 20, "connected again after the broker restart")

        renewed, renewed_key = client_cert(d, "renewed", days=365)
        Path(pki["client_cert"]).write_bytes(renewed.read_bytes())  # in place this time, the key not yet
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "the TLS files changed but cannot be used: mqtt.tls.key" in agent.log(), 20,
                 "a half-done renewal said at the reload")
        before = len(collector.reading_seqs())
        wait_for(lambda: len(collector.reading_seqs()) > before + 10, 10, "the working connection kept")
        Path(pki["client_key"]).write_bytes(renewed_key.read_bytes())
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "u'renewed'" in broker.log.read_text(), 20, "the broker sees the renewed certificate")
        wait_for(lambda: retained_expiry() != first, 10, "the retained status says the new expiry")
        assert parse_iso_utc_ms(retained_expiry()) > (time.time() + 300 * 86400) * 1000
        target = db_last_seq(tmp_path / "buffer.db")
        wait_for(lambda: collector.has_readings_upto(target), 20, "nothing lost across the renewal")
        collector.client.publish("env/TEST0001/cmd", json.dumps({"id": "s1", "cmd": "status"}), qos=1)
        reply = wait_for(lambda: next((m for m in collector.json_messages("/cmd/reply") if m.get("id") == "s1"),
                                      None), 10, "the status command's reply")
        assert reply["status"]["broker"]["cert_expires"] == retained_expiry(), reply
    finally:
        assert agent.stop() == 0
        collector.close()
        broker.stop()
    assert agent.log().count(warning) == 1, "warned once a day at most"


def test_each_unusable_tls_setup_is_one_line_naming_the_file_and_why(tmp_path):
    """A CA file of another CA, a broker certificate for another host name, a client certificate the
    broker's CA did not sign (refused after the handshake in TLS 1.3, in it in TLS 1.2): each agent
    keeps buffering and says in one line which file and why, in the log and in `status`."""
    pki = make_pki(tmp_path / "pki")
    d = tmp_path / "pki"
    openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.pem",
            "-days", "2", "-subj", "/CN=other-ca")
    stranger, stranger_key = client_cert(d, "stranger", days=365, ca="other")
    # A broker whose certificate names broker.example only, reached as 127.0.0.1.
    (d / "named.ext").write_text("subjectAltName=DNS:broker.example\n")
    openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "named.key", "-out", "named.csr", "-subj", "/CN=b")
    openssl(d, "x509", "-req", "-in", "named.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "named.pem", "-days", "2", "-extfile", "named.ext")
    broker = Broker(tmp_path / "broker", tls=pki).start()
    named = Broker(tmp_path / "named", tls={**pki, "server_cert": str(d / "named.pem"),
                                            "server_key": str(d / "named.key")}).start()
    tls12 = Broker(tmp_path / "tls12", tls=pki, extra="tls_version tlsv1.2").start()  # refuses in the handshake
    good = {"ca": pki["ca"], "cert": pki["client_cert"], "key": pki["client_key"]}
    cases = {  # name -> (broker, tls section, what the line says)
        "wrong ca": (broker, {**good, "ca": str(d / "other.pem")},
                     f"TLS handshake failed: the broker's certificate does not verify against mqtt.tls.ca "
                     f"({d / 'other.pem'}): self-signed certificate in certificate chain"),
        "host name": (named, good, "TLS handshake failed: the broker's certificate is not for 127.0.0.1 "
                                   "(IP address mismatch"),
        "unknown issuer": (broker, {**good, "cert": str(stranger), "key": str(stranger_key)},
                           f"the broker refused the client certificate mqtt.tls.cert ({stranger}): "
                           "TLS alert \"unknown ca\""),
        "unknown issuer, tls 1.2": (tls12, {**good, "cert": str(stranger), "key": str(stranger_key)},
                                    f"the broker refused the client certificate mqtt.tls.cert ({stranger}): "
                                    "TLS alert \"unknown ca\""),
    }
    agents = {}
    try:
        for name, (b, tls, _) in cases.items():
            station = tmp_path / name.replace(",", "").replace(" ", "-")
            station.mkdir()
            config = sim_config(station, b, channels=1, interval=0.2, mqtt={"reconnect_max": 1, "shutdown_grace": 1,
                                                                                  "tls": tls})
            agents[name] = (station, AgentProcess(write_config(station / "station.yaml", config)))
        for name, (station, agent) in agents.items():
            words = cases[name][2]
            wait_for(lambda: words in agent.log(), 20, f"{name}: {words}")  # noqa: B023 - called at once
            wait_for(lambda: db_last_seq(station / "buffer.db") >= 5, 20, f"{name}: readings buffered")  # noqa: B023
            assert agent.alive()
            # Said the same way from then on (with TLS 1.3 an attempt may find the socket closed before the
            # broker's alert is read: the alert seen on an earlier attempt stands for it).
            lines = [line for line in agent.log().splitlines() if "ERROR" in line]
            first = next(i for i, line in enumerate(lines) if words in line)
            assert all(words in line for line in lines[first:]), f"{name}: one reason, said the same way: {lines}"
            wait_for(lambda: words in (broker_status(station / "station.yaml").get("error") or ""), 10,  # noqa: B023
                     f"{name}: status says it")
    finally:
        for _, agent in agents.values():
            agent.signal(signal.SIGTERM)  # all at once: each spends its shutdown grace offline
        for _, agent in agents.values():
            assert agent.stop() == 0
        broker.stop()
        named.stop()
        tls12.stop()


def test_a_key_the_service_user_may_not_read_is_said_as_such():
    """Renewal tooling that writes the new key readable by root only: the line says the key file is
    not readable, not that it is the wrong key for the certificate."""
    top = Path(tempfile.mkdtemp(prefix="edge-agent-tls-"))  # in /tmp: every user may reach it
    try:
        pki = make_pki(top / "pki")
        top.chmod(0o755)
        for f in [top / "pki", *(top / "pki").iterdir()]:
            f.chmod(0o755)
        Path(pki["client_key"]).chmod(0)  # unreadable to its owner too (unless root: then the test acts as nobody)
        with as_another_user():
            try:
                tls_context(pki["ca"], pki["client_cert"], pki["client_key"])
            except TlsFilesError as exc:
                said = str(exc)
            else:
                raise AssertionError("an unreadable key was used")
        assert said == f"mqtt.tls.key ({pki['client_key']}): Permission denied", said
    finally:
        shutil.rmtree(top)


def test_check_config_says_a_client_certificate_expired_or_about_to(tmp_path):
    """The technician's check before leaving the station: an expired client certificate is a problem
    (the broker refuses it), one expiring within 30 days a warning, each at its line."""
    pki = make_pki(tmp_path / "pki")  # valid for 2 days
    expired, expired_key = client_cert(tmp_path / "pki", "expired", days=-1)
    broker = Broker(tmp_path / "broker", tls=pki)  # only its URL: check-config touches no network
    cases = {"expired": (expired, expired_key, 2, "mqtt.tls.cert: the client certificate expired on "),
             "soon": (Path(pki["client_cert"]), Path(pki["client_key"]), 0,
                      "mqtt.tls.cert: warning: the client certificate expires on ")}
    for name, (cert, key, code, words) in cases.items():
        tls = {"ca": pki["ca"], "cert": str(cert), "key": str(key)}
        cfg = write_config(tmp_path / f"{name}.yaml", sim_config(tmp_path, broker, mqtt={"tls": tls}))
        result = run_cli("check-config", str(cfg))
        assert result.returncode == code, result.stderr
        line_no = next(i for i, line in enumerate(cfg.read_text().splitlines(), 1) if line.strip().startswith("cert:"))
        said = [line for line in result.stderr.splitlines() if "mqtt.tls.cert" in line]
        assert len(said) == 1 and said[0].startswith(f"{cfg}:{line_no}:") and words in said[0], result.stderr


def test_a_reload_with_unchanged_settings_after_tls_was_dropped_keeps_the_connection(tmp_path):
    """A station moved from an mqtts broker to a plain one (mqtt.tls removed, SIGHUP): a later
    `systemctl reload` that changes nothing must not drop the working connection for a "renewal" of TLS
    files it no longer has."""
    pki = make_pki(tmp_path / "pki")
    tls_broker = Broker(tmp_path / "tls-broker", tls=pki).start()
    plain = Broker(tmp_path / "plain-broker").start()
    config = sim_config(tmp_path, tls_broker, channels=2, interval=0.2, mqtt={
        "reconnect_max": 1, "tls": {"ca": pki["ca"], "cert": pki["client_cert"], "key": pki["client_key"]}})
    cfg = write_config(tmp_path / "station.yaml", config)
    collector = Collector(plain, "env/#")
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: agent.log().count("connected to") >= 1, 20, "connected over TLS")
        moved = sim_config(tmp_path, plain, channels=2, interval=0.2, mqtt={"reconnect_max": 1})
        write_config(cfg, moved)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: collector.reading_seqs(), 20, "delivery to the plain broker")
        connections = agent.log().count("connected to")
        agent.signal(signal.SIGHUP)  # nothing changed
        wait_for(lambda: agent.log().count("configuration reloaded") >= 2, 10, "the second reload taken")
        before = len(collector.reading_seqs())
        wait_for(lambda: len(collector.reading_seqs()) > before + 20, 10, "readings go on")
        assert "TLS files changed" not in agent.log(), agent.log()
        assert agent.log().count("connected to") == connections, "the connection that works was kept"
    finally:
        assert agent.stop() == 0
        collector.close()
        plain.stop()
        tls_broker.stop()


def test_a_renewal_landing_while_the_connection_reads_the_files_is_what_status_says(tmp_path, monkeypatch):
    """A connection attempt reads the certificate's expiry, then builds its TLS context from the files; a
    renewal renamed into place between the two (the operator's tooling does not wait for the agent) had
    the connection made with the renewed files while `status` kept the expired certificate's date for an
    hour (CI saw it once: 'status shows the renewed certificate's expiry' timed out). The expiry said is
    that of the files the context was built of. Real certificates (openssl), real files."""
    from types import SimpleNamespace

    from agent import certwatch

    pki = make_pki(tmp_path / "pki")
    d = tmp_path / "pki"
    expired, expired_key = client_cert(d, "expired", days=-1)
    renewed, renewed_key = client_cert(d, "renewed", days=365)
    cert, key = d / "station.pem", d / "station.key"
    replace_atomically(cert, expired)
    replace_atomically(key, expired_key)
    watch = certwatch.CertWatch(SimpleNamespace(tls_ca=pki["ca"], tls_cert=str(cert), tls_key=str(key),
                                                tls_names=None, urls=["mqtts://127.0.0.1:8883"]))
    watch.check()  # the attempt reads the expiry: the expired certificate's
    assert watch.not_after is not None and watch.not_after < time.time()

    def renewal_lands_then_build(*args, **kwargs):
        replace_atomically(key, renewed_key)
        replace_atomically(cert, renewed)
        monkeypatch.setattr(certwatch, "tls_context", tls_context)
        return tls_context(*args, **kwargs)

    monkeypatch.setattr(certwatch, "tls_context", renewal_lands_then_build)
    watch.context()
    assert watch.in_use is not None and watch.in_use > time.time() + 300 * 86400
    assert watch.not_after == watch.in_use
