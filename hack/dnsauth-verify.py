#!/usr/bin/env python3
"""Checks a sending domain's mail and records with implementations independent of mailfleet:
dkimpy (DKIM), pyspf (SPF) and authheaders (DMARC), every DNS lookup sent to one server
(the Knot server a test started) through dnspython; the system resolver is never used.

usage: dnsauth-verify.py --dns 127.0.0.1:PORT dkim MESSAGE_FILE
       dnsauth-verify.py --dns 127.0.0.1:PORT spf IP MAIL_FROM HELO
       dnsauth-verify.py --dns 127.0.0.1:PORT dmarc DOMAIN
       dnsauth-verify.py --dns 127.0.0.1:PORT auth MESSAGE_FILE IP MAIL_FROM HELO
Prints one JSON object:
  dkim:  {"signatures": [{"d", "s", "a", "ok"}...]} (every DKIM-Signature, public keys
         looked up in DNS by dkimpy through the dnsfunc below)
  spf:   {"result": "pass"|"fail"|"softfail"|..., "explanation"}
  dmarc: {"record": {tag: value}} (parsed by authheaders; {} when none or several)
  auth:  {"header": the Authentication-Results authheaders computes (spf, dkim, dmarc)}
Leading X-Sink-* trace lines of the sink (added after signing) are dropped from messages."""
import argparse
import json
import sys

import dns.resolver


def resolver_at(server):
    host, _, port = server.rpartition(":")
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [host]
    r.port = int(port)
    r.timeout = 3
    r.lifetime = 5
    r.cache = None
    # Every library here (dkimpy, pyspf, authheaders) asks dnspython's default resolver.
    dns.resolver.default_resolver = r
    return r


def message(path):
    lines = open(path, "rb").read().split(b"\r\n")
    while lines and lines[0].startswith(b"X-Sink-"):
        lines.pop(0)
    return b"\r\n".join(lines)


def dkim_check(resolver, path):
    import dkim

    def dnsfunc(name, timeout=5):
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        # A TXT record's character-strings are one value (DKIM RSA keys need several).
        return b"".join(answer[0].strings)

    msg = message(path)
    d = dkim.DKIM(msg)
    sigs = [v for (k, v) in d.headers if k.lower() == b"dkim-signature"]
    out = []
    for i, sig in enumerate(sigs):
        tags = {}
        for t in sig.split(b";"):
            if b"=" in t:
                k, v = t.split(b"=", 1)
                tags[k.strip().decode()] = b"".join(v.split()).decode()
        ok = bool(d.verify(idx=i, dnsfunc=dnsfunc))
        out.append({"d": tags.get("d", ""), "s": tags.get("s", ""),
                    "a": tags.get("a", ""), "ok": ok})
    return {"signatures": out}


def spf_check(ip, mail_from, helo):
    import spf
    result, explanation = spf.check2(i=ip, s=mail_from, h=helo)
    return {"result": result, "explanation": explanation}


def dmarc_check(domain):
    from authheaders.dmarc_lookup import receiver_record
    record, _ = receiver_record(domain)
    return {"record": record}


def auth_check(path, ip, mail_from, helo):
    import authheaders
    header = authheaders.authenticate_message(
        message(path), "sink.example.test", spf=True, dkim=True, dmarc=True,
        ip=ip, mail_from=mail_from, helo=helo)
    return {"header": header}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dns", required=True, help="host:port of the DNS server to ask")
    p.add_argument("check", choices=["dkim", "spf", "dmarc", "auth"])
    p.add_argument("args", nargs="*")
    a = p.parse_args()
    resolver = resolver_at(a.dns)
    if a.check == "dkim":
        out = dkim_check(resolver, *a.args)
    elif a.check == "spf":
        out = spf_check(*a.args)
    elif a.check == "dmarc":
        out = dmarc_check(*a.args)
    else:
        out = auth_check(*a.args)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
