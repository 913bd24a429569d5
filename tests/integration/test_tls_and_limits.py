"""A broker that demands TLS client certificates and a password; the buffer's size cap in an outage."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from harness import AgentProcess, Broker, Collector, db_last_seq, run_cli, secret, sim_config, wait_for, write_config


def make_pki(d: Path) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=test-ca")
    exts = (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth"))
    for name, ext in exts:
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {"ca": str(d / "ca.pem"), "server_cert": str(d / "server.pem"), "server_key": str(d / "server.key"),
            "client_cert": str(d / "client.pem"), "client_key": str(d / "client.key")}


def test_tls_client_certificate_and_password_wrong_then_fixed_by_sighup(tmp_path):
    pki = make_pki(tmp_path / "pki")
    password = secret("s3cret-Pa55word")
    broker = Broker(tmp_path / "broker", tls=pki, passwords={"station": password}).start()
    pwfile = tmp_path / "mqtt.pass"
    pwfile.write_text(secret("wrong-password") + "\n")
    config = sim_config(tmp_path, broker, channels=2, interval=0.2, mqtt={
        "username": "station", "password_file": str(pwfile), "reconnect_max": 1,
        "tls": {"ca": pki["ca"], "cert": pki["client_cert"], "key": pki["client_key"]},
    })
    cfg = write_config(tmp_path / "station.yaml", config)
    collector = Collector(broker, "env/#", username="station", password=password, tls=pki)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: "refused" in agent.log() and "password" in agent.log(), 20, "a clear refusal in the log")
        wait_for(lambda: db_last_seq(tmp_path / "buffer.db") >= 20, 20, "readings buffered meanwhile")
        assert agent.alive()
        assert not collector.reading_seqs()
        pwfile.write_text(password + "\n")
        agent.signal(signal.SIGHUP)
        wait_for(lambda: collector.reading_seqs() and min(collector.reading_seqs()) == 1, 30,
                 "delivery from seq 1 once the password is fixed")
        target = db_last_seq(tmp_path / "buffer.db")
        wait_for(lambda: collector.has_readings_upto(target), 30, "the whole backlog")
    finally:
        assert agent.stop() == 0
        collector.close()
        broker.stop()
    log = agent.log()
    assert password not in log and "wrong-password" not in log, "no password in any log line"
    key = Path(pki["client_key"]).read_text()
    assert secret(key.splitlines()[1]) not in log, "no key material in any log line"


def test_a_client_key_protected_by_a_passphrase_is_refused_with_that_reason(tmp_path):
    """OpenSSL would ask for the passphrase on the terminal (a technician's `run` hung there, deaf to
    SIGTERM); the agent says what is wrong instead, keeps buffering, and stops cleanly."""
    pki = make_pki(tmp_path / "pki")
    locked = tmp_path / "pki" / "client-locked.key"
    subprocess.run(["openssl", "pkey", "-in", pki["client_key"], "-aes256", "-passout", "pass:hunter2",
                    "-out", str(locked)], check=True, capture_output=True)
    broker = Broker(tmp_path / "broker", tls=pki).start()
    config = sim_config(tmp_path, broker, channels=2, interval=0.2, mqtt={
        "reconnect_max": 1, "tls": {"ca": pki["ca"], "cert": pki["client_cert"], "key": str(locked)}})
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
    try:
        wait_for(lambda: "protected by a passphrase" in agent.log(), 20, "the reason in the log")
        wait_for(lambda: db_last_seq(tmp_path / "buffer.db") >= 10, 20, "readings buffered meanwhile")
    finally:
        assert agent.stop() == 0
        broker.stop()
    assert "mqtt.tls.key" in agent.log() and "PEM pass phrase" not in agent.log()


def test_check_config_finds_tls_files_that_cannot_make_a_connection(tmp_path):
    """Each file is there and readable, yet `run` could not use them: check-config says which key and
    why, at its line, before the technician leaves the station."""
    pki = make_pki(tmp_path / "pki")
    locked = tmp_path / "pki" / "client-locked.key"
    subprocess.run(["openssl", "pkey", "-in", pki["client_key"], "-aes256", "-passout", "pass:hunter2",
                    "-out", str(locked)], check=True, capture_output=True)
    garbage = tmp_path / "pki" / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    garbage_key = tmp_path / "pki" / "garbage.key"
    garbage_key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    broker = Broker(tmp_path / "broker", tls=pki)  # only its URL: check-config touches no network
    good = {"ca": pki["ca"], "cert": pki["client_cert"], "key": pki["client_key"]}
    cases = {
        "valid": ({}, None),
        "passphrase": ({"key": str(locked)}, ("mqtt.tls.key", "protected by a passphrase")),
        "not pem": ({"cert": str(garbage)}, ("mqtt.tls.cert", "cannot be used for TLS")),
        "key of another certificate": ({"key": pki["server_key"]}, ("mqtt.tls.key", "not the PEM private key of")),
        "key not pem": ({"key": str(garbage_key)}, ("mqtt.tls.key", "not the PEM private key of")),
        "ca not pem": ({"ca": str(garbage)}, ("mqtt.tls.ca", "cannot be used for TLS")),
    }
    for name, (change, expected) in cases.items():
        config = sim_config(tmp_path, broker, mqtt={"tls": {**good, **change}})
        cfg = write_config(tmp_path / f"{name.replace(' ', '-')}.yaml", config)
        result = run_cli("check-config", str(cfg))
        if expected is None:
            assert result.returncode == 0, result.stderr
            continue
        assert result.returncode == 2, f"{name}: {result.stderr}"
        key, words = expected
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f": {key}: " in lines[0] and words in lines[0], f"{name}: {lines}"
        line_no = int(lines[0].split(":")[1])
        assert cfg.read_text().splitlines()[line_no - 1].strip().startswith(key.rsplit(".", 1)[1] + ":"), \
            f"{name}: the line of {key}"
        assert "hunter2" not in result.stderr


def test_tls_problems_name_the_config_file_as_given_on_the_command_line(tmp_path):
    """`check-config station.yaml` in the config's directory: a TLS file that cannot make a connection
    is reported as `station.yaml:LINE:COL: ...`, as every other problem is, not by an absolute path."""
    pki = make_pki(tmp_path / "pki")
    locked = tmp_path / "pki" / "client-locked.key"
    subprocess.run(["openssl", "pkey", "-in", pki["client_key"], "-aes256", "-passout", "pass:hunter2",
                    "-out", str(locked)], check=True, capture_output=True)
    broker = Broker(tmp_path / "broker", tls=pki)  # only its URL: check-config touches no network
    cases = {  # the tls section -> the key at fault, the start of its message
        "ca": ({"ca": pki["client_key"]}, "cannot be used for TLS: "),  # a private key where the CA belongs
        "key": ({"ca": pki["ca"], "cert": pki["client_cert"], "key": str(locked)},
                "cannot be used for TLS: protected by a passphrase"),
    }
    for key, (tls, words) in cases.items():
        cfg = write_config(tmp_path / "station.yaml", sim_config(tmp_path, broker, mqtt={"tls": tls}))
        result = run_cli("check-config", "station.yaml", cwd=tmp_path)
        lines = cfg.read_text().splitlines()
        line_no = next(i for i, line in enumerate(lines, 1) if line.strip().startswith(f"{key}: "))
        col = lines[line_no - 1].index(tls[key]) + 1
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"station.yaml:{line_no}:{col}: mqtt.tls.{key}: {words}"), result.stderr
        assert len(result.stderr.splitlines()) == 1 and "hunter2" not in result.stderr


def test_a_tls_file_that_cannot_make_a_connection_is_reported_beside_the_files_other_problems(tmp_path):
    """check-config prints every problem (SPEC §1). A CA that is no certificate was reported only once the
    rest of the file was valid: with a typo elsewhere, the technician fixed it, ran check-config again
    and only then learnt of the CA (on a visit, after copying the files over once more)."""
    pki = make_pki(tmp_path / "pki")
    broker = Broker(tmp_path / "broker", tls=pki)  # only its URL: check-config touches no network
    config = sim_config(tmp_path, broker, mqtt={"tls": {"ca": pki["client_key"]}})  # a key where the CA belongs
    config["storage"]["max_mb"] = 0
    cfg = write_config(tmp_path / "station.yaml", config)
    result = run_cli("check-config", str(cfg))
    assert result.returncode == 2, result.stderr
    lines = cfg.read_text().splitlines()
    at = {key: next(i for i, line in enumerate(lines, 1) if line.strip().startswith(f"{key}:"))
          for key in ("max_mb", "ca")}
    max_mb, ca = result.stderr.splitlines()
    assert max_mb == f"{cfg}:{at['max_mb']}:11: storage.max_mb: must be at least 0.1 MB (got 0)", result.stderr
    assert ca.startswith(f"{cfg}:{at['ca']}:9: mqtt.tls.ca: cannot be used for TLS: "), result.stderr


def test_a_gap_recorded_while_connected_is_announced_on_the_same_connection(tmp_path):
    """The link stays up but carries nothing (a frozen broker): the buffer reaches its cap and drops
    unpublished readings while the agent still counts itself connected. The gap is announced as soon
    as the link moves again, not only at the next connection."""
    broker = Broker(tmp_path / "broker").start()
    collector = Collector(broker, "env/#")
    config = sim_config(tmp_path, broker, channels=40, interval=0.1,
                        storage={"max_mb": 0.2, "commit_interval_ms": 100}, mqtt={"keepalive": 600})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    assert broker.proc is not None
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 200, 20, "some readings published")
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: "gap recorded" in agent.log(), 60, "eviction of unpublished readings")
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        gaps = lambda: [m for m in collector.json_messages("/data") if "gap" in m]  # noqa: E731
        wait_for(gaps, 30, "the gap announced on the data topic")
        assert agent.log().count("connected to") == 1, "announced without a new connection"
        target = db_last_seq(tmp_path / "buffer.db")
        wait_for(lambda: max(collector.reading_seqs() or [0]) >= target, 30, "backlog delivered")
        announced = set()
        for g in gaps():
            assert g["reason"] == "buffer_full"
            announced |= set(range(g["gap"][0], g["gap"][1] + 1))
        missing = set(range(1, target + 1)) - set(collector.reading_seqs()) - announced
        assert not missing, f"seqs missing without an announced gap: {sorted(missing)[:10]}"
    finally:
        assert agent.stop() == 0
        collector.close()
        broker.stop()


def test_size_cap_during_outage_purges_published_then_drops_oldest_and_announces_the_gap(tmp_path):
    broker = Broker(tmp_path / "broker", persistence=True).start()
    collector = Collector(broker, "env/#", persistent=True)
    config = sim_config(tmp_path, broker, channels=80, interval=0.1,  # 800 readings/s: the cap soon
                        storage={"max_mb": 0.5, "commit_interval_ms": 100})
    cfg = write_config(tmp_path / "station.yaml", config)
    agent = AgentProcess(cfg)
    try:
        wait_for(lambda: len(collector.reading_seqs()) >= 500, 20, "some readings published")
        broker.stop()
        received_before_outage = len(collector.reading_seqs())
        wait_for(lambda: "dropped" in agent.log() and "gap recorded" in agent.log(), 120,
                 "eviction of unpublished readings")
        assert "purged" in agent.log(), "published rows went first"
        assert (tmp_path / "buffer.db").stat().st_size <= 0.5 * 1024 * 1024 + 8192
        broker.start()
        after = collector
        gaps = lambda: [m for m in after.json_messages("/data") if "gap" in m]  # noqa: E731
        wait_for(gaps, 30, "the gap announced on the data topic")
        gap = gaps()[0]
        assert gap["reason"] == "buffer_full" and gap["gap"][0] <= gap["gap"][1]
        time.sleep(1)
        target = db_last_seq(tmp_path / "buffer.db")
        wait_for(lambda: max(after.reading_seqs() or [0]) >= target, 30, "backlog delivered")
        received = set(collector.reading_seqs())
        announced = set()
        for g in gaps():
            announced |= set(range(g["gap"][0], g["gap"][1] + 1))
        missing = set(range(1, target + 1)) - received - announced
        assert not missing, f"seqs missing without an announced gap: {sorted(missing)[:10]}"
        # What the gap says was dropped never arrives after it (the agent encodes its backlog ahead
        # while offline: the eviction must discard those prepared messages too).
        resurrected = set(collector.reading_seqs()[received_before_outage:]) & announced
        assert not resurrected, f"readings announced as dropped were published: {sorted(resurrected)[:10]}"
        after.close()
    finally:
        assert agent.stop() == 0
        broker.stop()
    assert json.dumps(gap)
