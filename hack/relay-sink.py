#!/usr/bin/env python3
"""Scriptable SMTP sink (aiosmtpd) for the relay's integration tests.

usage: relay-sink.py --port P --save DIR [--host 127.0.0.1] [--reject-rcpt SUBSTR]
                     [--tempfail-rcpt SUBSTR] [--block-rcpt SUBSTR]
Every message is saved as DIR/NNNNNNNN.eml, prefixed with trace headers the tests read:
X-Sink-Peer (client address: the relay's bound egress address), X-Sink-Helo,
X-Sink-From, X-Sink-To. The file appears atomically (written then renamed).
Prints 'listening' once ready."""
import argparse, os, signal
from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, a):
        self.a, self.count = a, 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.a.reject_rcpt and self.a.reject_rcpt in address:
            return "550 5.1.1 no such user (test sink)"
        if self.a.block_rcpt and self.a.block_rcpt in address:
            return "554 5.7.1 blocked by policy (test sink)"
        if self.a.tempfail_rcpt and self.a.tempfail_rcpt in address:
            return "451 4.3.0 try again later (test sink)"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        name = os.path.join(self.a.save, f"{os.getpid()}-{self.count:08d}.eml")
        with open(name + ".tmp", "wb") as f:
            f.write(f"X-Sink-Peer: {session.peer[0]}\r\n".encode())
            f.write(f"X-Sink-Helo: {session.host_name}\r\n".encode())
            f.write(f"X-Sink-From: {envelope.mail_from}\r\n".encode())
            f.write(f"X-Sink-To: {','.join(envelope.rcpt_tos)}\r\n".encode())
            f.write(envelope.original_content or envelope.content)
        os.rename(name + ".tmp", name)
        return "250 2.0.0 Ok: queued"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--reject-rcpt")
    p.add_argument("--tempfail-rcpt")
    p.add_argument("--block-rcpt")
    a = p.parse_args()
    os.makedirs(a.save, exist_ok=True)
    c = Controller(Handler(a), hostname=a.host, port=a.port,
                   server_hostname="sink.example.test", decode_data=False,
                   data_size_limit=64 * 1024 * 1024)
    c.start()
    print("listening", flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    c.stop()


if __name__ == "__main__":
    main()
