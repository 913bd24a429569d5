"""A wall clock moved for one agent process: `CLOCKSHIFT_C`, a tiny LD_PRELOAD shim that a test compiles with
gcc (libfaketime breaks Python's time.sleep), makes `clock_gettime` for CLOCK_REALTIME(_COARSE),
`gettimeofday` and `time` (so Python's time.time, time.time_ns and datetime.now) return the real time plus
an offset in seconds, read from the file named by $CLOCKSHIFT_FILE at most every 50 ms; the monotonic
clock is untouched, as a real step leaves it. `ShiftedClock` writes that file and tells the test the time
the agent sees; the `clockshift` fixture (tests/conftest.py) builds and checks the shim.

Used to step the clock as NTP would (tests/integration/test_clock_step.py), and to start an agent a few
seconds before a minute boundary, so that a test of minute periods does not wait up to a minute for one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import build_preload_shim

CLOCKSHIFT_C = r"""
/* LD_PRELOAD shim for tests (tests/clockshift.py): the wall clock (CLOCK_REALTIME,
   CLOCK_REALTIME_COARSE, gettimeofday, time) runs offset by the number of seconds written in the file
   named by $CLOCKSHIFT_FILE, re-read at most every 50 ms; every other clock is left alone. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define NS 1000000000LL
#define REREAD_NS 50000000LL

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);
typedef int (*gettimeofday_fn)(struct timeval *, void *);

static clock_gettime_fn real_clock_gettime;
static gettimeofday_fn real_gettimeofday;
static _Atomic int64_t offset_ns;   /* the offset now in force */
static _Atomic int64_t next_read_ns; /* monotonic time at which the file is read again */
static char path[4096];

static void resolve(void) {
    if (!real_clock_gettime) real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    if (!real_gettimeofday) real_gettimeofday = (gettimeofday_fn)dlsym(RTLD_NEXT, "gettimeofday");
}

__attribute__((constructor)) static void init(void) {
    const char *p = getenv("CLOCKSHIFT_FILE");
    resolve();
    if (p) strncpy(path, p, sizeof path - 1);
}

static int64_t offset(void) {
    struct timespec m;
    if (!path[0] || real_clock_gettime(CLOCK_MONOTONIC, &m) != 0) return atomic_load(&offset_ns);
    int64_t now = (int64_t)m.tv_sec * NS + m.tv_nsec;
    int64_t due = atomic_load(&next_read_ns);
    /* One thread reads the file; the others go on with the offset in force. */
    if (now >= due && atomic_compare_exchange_strong(&next_read_ns, &due, now + REREAD_NS)) {
        int saved = errno;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            char buf[64];
            ssize_t n = read(fd, buf, sizeof buf - 1);
            close(fd);
            if (n > 0) {
                char *end;
                buf[n] = 0;
                double seconds = strtod(buf, &end);
                if (end != buf) atomic_store(&offset_ns, (int64_t)(seconds * 1e9));
            }
        }
        errno = saved;
    }
    return atomic_load(&offset_ns);
}

static int64_t floordiv(int64_t a, int64_t b) { return a / b - (a % b != 0 && (a < 0) != (b < 0)); }

int clock_gettime(clockid_t clk, struct timespec *ts) {
    resolve();
    int rc = real_clock_gettime(clk, ts);
    if (rc == 0 && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE)) {
        int64_t t = (int64_t)ts->tv_sec * NS + ts->tv_nsec + offset();
        ts->tv_sec = (time_t)floordiv(t, NS);
        ts->tv_nsec = (long)(t - (int64_t)ts->tv_sec * NS);
    }
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    resolve();
    int rc = real_gettimeofday(tv, tz);
    if (rc == 0) {
        int64_t t = (int64_t)tv->tv_sec * NS + (int64_t)tv->tv_usec * 1000 + offset();
        tv->tv_sec = (time_t)floordiv(t, NS);
        tv->tv_usec = (suseconds_t)((t - (int64_t)tv->tv_sec * NS) / 1000);
    }
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return (time_t)-1;
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
"""

# Run under the shim by the self-check: the wall clock (time.time, time.time_ns, datetime.now) must follow the
# file, the monotonic clock, sleeps and timed waits (Event.wait) must not.
SHIM_PROBE = r"""
import datetime, json, os, sys, threading, time
path = sys.argv[1]
def offset(seconds):
    with open(path + ".tmp", "w") as f:
        f.write(str(seconds))
    os.replace(path + ".tmp", path)
w0, m0 = time.time(), time.monotonic()
offset(-90)
time.sleep(0.3)
w1, m1 = time.time(), time.monotonic()
d1, n1 = datetime.datetime.now(datetime.timezone.utc).timestamp(), time.time_ns() / 1e9
threading.Event().wait(0.3)
m2 = time.monotonic()
offset(30)
time.sleep(0.3)
w3, m3 = time.time(), time.monotonic()
print(json.dumps({"real": float(sys.argv[2]), "w0": w0, "m0": m0, "w1": w1, "m1": m1, "d1": d1, "n1": n1,
                  "m2": m2, "w3": w3, "m3": m3}))
"""


class ShiftedClock:
    """The agent's wall clock: the real one plus the offset in the file its shim reads."""

    def __init__(self, path: Path, so: Path):
        self.path = path
        self.offset = 0.0
        self.env = {"LD_PRELOAD": str(so), "CLOCKSHIFT_FILE": str(path)}
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{self.offset:.6f}\n")
        os.replace(tmp, self.path)  # the shim never reads a half-written file

    def now(self) -> float:
        return time.time() + self.offset

    def step(self, seconds: float) -> float:
        self.offset += seconds
        self._write()
        return seconds

    def place(self, at: float) -> float:
        """Set the agent's clock to `at` (Unix seconds); returns the step."""
        return self.step(at - self.now())

    def lead_to_a_minute(self, lead_s: float) -> int:
        """Put the agent's clock `lead_s` seconds before a minute boundary, at most a minute ahead of the
        real clock (a test of minute periods need not wait for the wall clock to reach one); returns
        that boundary (Unix seconds)."""
        boundary = math.ceil((time.time() + lead_s) / 60) * 60
        self.place(boundary - lead_s)
        return boundary


def build_clockshift(build: Path) -> Path:
    """The shim, compiled into `build`, after checking that it does what the tests rely on."""
    so = build_preload_shim(CLOCKSHIFT_C, "clockshift", build, "wall-clock")
    offset = build / "probe-offset"
    offset.write_text("0\n")
    probe = subprocess.run([sys.executable, "-c", SHIM_PROBE, str(offset), str(time.time())], capture_output=True,
                           text=True, timeout=30, env={**os.environ, "LD_PRELOAD": str(so),
                                                       "CLOCKSHIFT_FILE": str(offset)})
    assert probe.returncode == 0, probe.stderr
    p = json.loads(probe.stdout)
    assert abs(p["w0"] - p["real"]) < 5, f"the shim must leave the clock alone at offset 0: {p}"
    assert 0.3 <= p["m1"] - p["m0"] < 1.5 and 0.3 <= p["m2"] - p["m1"] < 1.5 and 0.3 <= p["m3"] - p["m2"] < 1.5, (
        f"sleep or Event.wait broken under the shim: {p}")
    assert (p["w1"] - p["w0"]) - (p["m1"] - p["m0"]) == pytest.approx(-90, abs=0.1), f"no backward step: {p}"
    assert p["d1"] == pytest.approx(p["w1"], abs=0.1) and p["n1"] == pytest.approx(p["w1"], abs=0.1), (
        f"datetime.now or time.time_ns not shifted: {p}")
    assert (p["w3"] - p["w1"]) - (p["m3"] - p["m1"]) == pytest.approx(120, abs=0.1), f"no forward step: {p}"
    return so
