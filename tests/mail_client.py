#!/usr/bin/env python3
"""Mail client for tests/mail.rs and benches/net.rs: Python's smtplib and
poplib (real clients nobody here wrote) against the test guest's `mail`.

Messages are generated from (seed, size): a Subject naming the seed, then
CRLF lines up to `size` bytes, among them lines that start with "." and
lines that are only "." — so SMTP dot-stuffing and POP3 dot-stuffing are
both exercised. Usage:

  mail_client.py send SEED:SIZE...       one SMTP session, each message
  mail_client.py parallel K SEED:SIZE... K sessions at once, each sending all
                                        (seeds offset by 1000 * session)
  mail_client.py check SEED:SIZE...      POP3: exactly these messages, byte
                                        for byte (and UIDL unique)
  mail_client.py dele SEED               POP3: delete that message, QUIT
  mail_client.py contains TEXT           POP3: some message contains TEXT
  mail_client.py codes                   SMTP/POP3 reply codes
  mail_client.py stream SIZE STOP LIMIT  one SMTP session sending seeds 1, 2,
                                        ... until the file STOP exists (at most
                                        LIMIT), printing `sent K` after each 250
  mail_client.py rate N SIZE             send N messages, print msgs/s
  mail_client.py cost N SIZE             like rate, with the guest's XSTATS
                                        deltas per message
  mail_client.py echo PORT N             echo round trips, print p50/p99 ms
  mail_client.py drill CONN SIZES STOP LIMIT PACE_MS
                                        `tandem drill`'s load: one SMTP session
                                        sending seeds CONN*100000+1, +2, ...
                                        (sizes from the comma list in turn)
                                        until LIMIT or STOP exists, printing
                                        `try K` before and `sent K` after each
                                        250; a failure prints `error WHAT`
                                        and exits 3
  mail_client.py swaks CONN SIZES STOP LIMIT PACE_MS
                                        like drill, each message sent by its own
                                        swaks (Debian's SMTP client) session
  mail_client.py mailbox SIZES           POP3: one line per message, `have K ok`
                                        (byte for byte what drill sent), `have
                                        K differs`, or `foreign N`; `count N`
"""
import os
import poplib
import smtplib
import socket
import sys
import threading
import time

HOST = "10.0.2.15"
TIMEOUT = 300


def message(seed, size):
    head = "Subject: m%d\r\nFrom: a@test\r\nTo: b@test\r\n\r\n" % seed
    out = [head.encode()]
    n = len(out[0])
    i = 0
    while n < size:
        if i % 13 == 0:
            line = "."
        elif i % 7 == 0:
            line = ".starts with a dot %d" % i
        elif i % 11 == 0:
            line = "..two dots %d" % i
        else:
            line = "line %d of %d %s" % (i, seed, "abcdefghij"[: i % 10] * (i % 7))
        b = (line + "\r\n").encode()
        out.append(b)
        n += len(b)
        i += 1
    return b"".join(out)


def seed_of(lines):
    """The seed in a generated message's Subject (-1 for other mail)."""
    head = lines[0] if lines else b""
    if head.startswith(b"Subject: m") and head[10:].isdigit():
        return int(head[10:])
    return -1


def contains(text):
    p = pop_login()
    count, _ = p.stat()
    found = False
    for k in range(1, count + 1):
        _, lines, _ = p.retr(k)
        found = found or text.encode() in b"\r\n".join(lines)
    p.quit()
    assert found, "no message contains %r" % text
    print("found", text, flush=True)


def specs(args):
    return [tuple(int(x) for x in a.split(":")) for a in args]


def send(pairs):
    s = smtplib.SMTP(HOST, 25, timeout=TIMEOUT)
    code, _ = s.ehlo("client.test")
    assert code == 250, code
    for seed, size in pairs:
        refused = s.sendmail("a@test", ["b@test"], message(seed, size))
        assert refused == {}, refused
        print("sent", seed, flush=True)
    s.quit()


def stream(size, stop, limit):
    """Message after message over ONE SMTP connection (a reset or a refusal
    fails the script) until STOP exists; the session ends with QUIT/221."""
    s = smtplib.SMTP(HOST, 25, timeout=TIMEOUT)
    code, _ = s.ehlo("client.test")
    assert code == 250, code
    k = 0
    while k < limit and not os.path.exists(stop):
        k += 1
        refused = s.sendmail("a@test", ["b@test"], message(k, size))
        assert refused == {}, refused
        print("sent", k, flush=True)
    code, _ = s.quit()
    assert code == 221, code
    print("streamed", k, flush=True)


def drill_size(sizes, seed):
    return sizes[(seed % 100000 - 1) % len(sizes)]


def drill(conn, sizes, stop, limit, pace_ms):
    """The drill's load: stops at the first failure, saying what it was."""
    try:
        s = smtplib.SMTP(HOST, 25, timeout=TIMEOUT)
        code, _ = s.ehlo("client.test")
        assert code == 250, code
    except Exception as e:
        print("error connect %s %s" % (type(e).__name__, e), flush=True)
        sys.exit(3)
    k = 0
    while k < limit and not os.path.exists(stop):
        k += 1
        seed = conn * 100000 + k
        print("try", seed, flush=True)
        try:
            refused = s.sendmail("a@test", ["b@test"], message(seed, drill_size(sizes, seed)))
        except Exception as e:
            print("error %s %s" % (type(e).__name__, e), flush=True)
            sys.exit(3)
        if refused:
            print("error refused %r" % refused, flush=True)
            sys.exit(3)
        print("sent", seed, flush=True)
        if pace_ms:
            time.sleep(pace_ms / 1000.0)
    try:
        code, _ = s.quit()
    except Exception as e:
        print("error quit %s %s" % (type(e).__name__, e), flush=True)
        sys.exit(3)
    print("done", k, flush=True)


def swaks(conn, sizes, stop, limit, pace_ms):
    """The drill's load through swaks: one SMTP session per message."""
    import subprocess
    import tempfile

    k = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "message")
        while k < limit and not os.path.exists(stop):
            k += 1
            seed = conn * 100000 + k
            with open(path, "wb") as f:
                # swaks ends the DATA with its own CRLF before the dot.
                f.write(message(seed, drill_size(sizes, seed))[:-2])
            print("try", seed, flush=True)
            r = subprocess.run(
                ["swaks", "--server", HOST, "--port", "25", "--helo", "client.test",
                 "--from", "a@test", "--to", "b@test", "--data", "@" + path,
                 "--timeout", str(TIMEOUT), "--silent", "2"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if r.returncode != 0:
                said = (r.stdout + r.stderr).strip().splitlines()
                print("error swaks status %d: %s" % (r.returncode, " | ".join(said[-3:])), flush=True)
                sys.exit(3)
            print("sent", seed, flush=True)
            if pace_ms:
                time.sleep(pace_ms / 1000.0)
    print("done", k, flush=True)


def mailbox(sizes):
    p = pop_login()
    count, _ = p.stat()
    for k in range(1, count + 1):
        _, lines, _ = p.retr(k)
        data = b"\r\n".join(lines) + b"\r\n"
        seed = seed_of(lines)
        if seed <= 0:
            print("foreign", k, flush=True)
            continue
        ok = data == message(seed, drill_size(sizes, seed))
        print("have", seed, "ok" if ok else "differs", flush=True)
    p.quit()
    print("count", count, flush=True)


def pop_login():
    p = poplib.POP3(HOST, 110, timeout=TIMEOUT)
    p.user("user")
    p.pass_("secret")
    return p


def retr_all(p):
    """{seed: bytes} of every message in the maildrop."""
    got = {}
    count, _ = p.stat()
    for k in range(1, count + 1):
        _, lines, octets = p.retr(k)
        data = b"\r\n".join(lines) + b"\r\n"
        assert octets >= len(data) - 2, (octets, len(data))
        seed = seed_of(lines)
        assert seed not in got, "message m%d twice" % seed
        got[seed] = data
    return got


def check(pairs):
    p = pop_login()
    got = retr_all(p)
    _, uidl, _ = p.uidl()
    uids = [u.split()[1] for u in uidl]
    assert len(set(uids)) == len(uids), uids
    p.quit()
    want = {seed: message(seed, size) for seed, size in pairs}
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for seed, data in want.items():
        assert got[seed] == data, "m%d differs (%d vs %d bytes)" % (seed, len(got[seed]), len(data))
    print("checked", len(want), "messages", flush=True)


def dele(seed):
    p = pop_login()
    count, _ = p.stat()
    for k in range(1, count + 1):
        _, lines, _ = p.retr(k)
        if seed_of(lines) == seed:
            assert p.dele(k).startswith(b"+OK")
            p.quit()
            print("deleted", seed, flush=True)
            return
    raise SystemExit("m%d not found" % seed)


def codes():
    s = smtplib.SMTP(HOST, 25, timeout=TIMEOUT)
    assert s.docmd("MAIL FROM:<a@test>")[0] == 503  # before EHLO
    code, text = s.ehlo("client.test")
    assert code == 250 and b"SIZE" in text, (code, text)
    assert s.docmd("RCPT TO:<b@test>")[0] == 503  # before MAIL
    assert s.docmd("DATA")[0] == 503
    assert s.docmd("MAIL FROM:<a@test>")[0] == 250
    assert s.docmd("MAIL FROM:<a@test>")[0] == 503  # nested
    assert s.docmd("DATA")[0] == 554  # no recipients
    assert s.docmd("RCPT TO:<b@test>")[0] == 250
    assert s.docmd("RSET")[0] == 250
    assert s.docmd("DATA")[0] == 503  # RSET cleared the transaction
    assert s.docmd("NOOP")[0] == 250
    assert s.docmd("FROB")[0] == 500
    assert s.docmd("MAIL FROM:<a@test> SIZE=99999999")[0] == 552
    assert s.docmd("HELO")[0] == 501
    assert s.docmd("QUIT")[0] == 221
    p = poplib.POP3(HOST, 110, timeout=TIMEOUT)
    for cmd in ("STAT", "RETR 1", "PASS x"):
        try:
            p._shortcmd(cmd)
            raise SystemExit("POP3 %s before login succeeded" % cmd)
        except poplib.error_proto:
            pass
    p.user("user")
    p.pass_("secret")
    count, _ = p.stat()
    try:
        p.retr(count + 1)
        raise SystemExit("RETR of a missing message succeeded")
    except poplib.error_proto:
        pass
    p.quit()
    print("codes ok", flush=True)


def rate(n, size):
    s = smtplib.SMTP(HOST, 25, timeout=TIMEOUT)
    s.ehlo("client.test")
    msg = message(1, size)
    t = time.time()
    for _ in range(n):
        s.sendmail("a@test", ["b@test"], msg)
    dt = time.time() - t
    s.quit()
    print("rate %.3f msgs/s" % (n / dt), flush=True)


def xstats(s):
    _, text = s.docmd("XSTATS")
    return {k: int(v) for k, v in (kv.split("=") for kv in text.decode().split())}


def cost(n, size):
    """What N messages of SIZE cost the guest, per message (XSTATS)."""
    s = smtplib.SMTP(HOST, 25, timeout=TIMEOUT)
    s.ehlo("client.test")
    msg = message(1, size)
    a = xstats(s)
    t = time.time()
    for _ in range(n):
        s.sendmail("a@test", ["b@test"], msg)
    dt = time.time() - t
    b = xstats(s)
    s.quit()
    d = {k: (b[k] - a[k]) / n for k in a if k != "hz"}
    print(
        "cost busy_tsc %.0f rx %.2f tx %.2f notifies %.2f msgs/s %.3f"
        % (d["busy_tsc"], d["rx"], d["tx"], d["notifies"], n / dt),
        flush=True,
    )


def echo(port, n):
    s = socket.create_connection((HOST, port), timeout=TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for i in range(n):
        msg = b"ping %d\n" % i
        t = time.perf_counter()
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            got += s.recv(4096)
        times.append(time.perf_counter() - t)
        assert got == msg, (got, msg)
    s.close()
    times.sort()
    p50 = times[len(times) // 2] * 1e3
    p99 = times[min(len(times) - 1, (len(times) * 99) // 100)] * 1e3
    print("echo p50 %.3f ms p99 %.3f ms" % (p50, p99), flush=True)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "send":
        send(specs(args))
    elif cmd == "parallel":
        k, pairs = int(args[0]), specs(args[1:])
        errors = []

        def one(j):
            try:
                send([(seed + 1000 * j, size) for seed, size in pairs])
            except Exception as e:  # reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=one, args=(j,)) for j in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    elif cmd == "check":
        check(specs(args))
    elif cmd == "dele":
        dele(int(args[0]))
    elif cmd == "contains":
        contains(args[0])
    elif cmd == "codes":
        codes()
    elif cmd == "stream":
        stream(int(args[0]), args[1], int(args[2]))
    elif cmd == "rate":
        rate(int(args[0]), int(args[1]))
    elif cmd == "cost":
        cost(int(args[0]), int(args[1]))
    elif cmd == "drill":
        sizes = [int(x) for x in args[1].split(",")]
        drill(int(args[0]), sizes, args[2], int(args[3]), int(args[4]))
    elif cmd == "swaks":
        sizes = [int(x) for x in args[1].split(",")]
        swaks(int(args[0]), sizes, args[2], int(args[3]), int(args[4]))
    elif cmd == "mailbox":
        mailbox([int(x) for x in args[0].split(",")])
    elif cmd == "echo":
        echo(int(args[0]), int(args[1]))
    else:
        raise SystemExit("unknown command " + cmd)


if __name__ == "__main__":
    main()
