#!/usr/bin/env python3
"""Verifies every DKIM-Signature of a message with dkimpy, an implementation independent of
the relay's (mail-auth). Public keys come from a file of 'selector._domainkey.domain TXT'
lines instead of DNS.
usage: relay-dkim-verify.py KEYS_FILE MESSAGE_FILE   -> prints one 'ok a=... s=...' per
signature, exit 0 when all verify and there is at least one."""
import sys
import dkim


def main():
    keys = {}
    for line in open(sys.argv[1]):
        if line.strip():
            name, txt = line.split(None, 1)
            keys[name.strip().rstrip(".").lower()] = txt.strip().encode()
    raw = open(sys.argv[2], "rb").read()
    # Drop the sink's trace headers: they were added after signing (like a Received line).
    lines = raw.split(b"\r\n")
    while lines and lines[0].startswith(b"X-Sink-"):
        lines.pop(0)
    msg = b"\r\n".join(lines)

    def dnsfunc(name, timeout=5):
        return keys.get(name.decode().rstrip(".").lower())

    d = dkim.DKIM(msg)
    sigs = [v for (k, v) in d.headers if k.lower() == b"dkim-signature"]
    if not sigs:
        print("no DKIM-Signature")
        sys.exit(1)
    ok = True
    for i in range(len(sigs)):
        good = d.verify(idx=i, dnsfunc=dnsfunc)
        tags = dict(t.strip().split(b"=", 1) for t in sigs[i].split(b";") if b"=" in t)
        print(("ok" if good else "FAIL"), "a=" + tags.get(b"a", b"").decode(),
              "s=" + tags.get(b"s", b"").decode(), "h=" + tags.get(b"h", b"").decode().replace(" ", "").replace("\r\n", ""))
        ok = ok and good
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
