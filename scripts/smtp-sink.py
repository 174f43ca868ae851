#!/usr/bin/env python3
"""A real SMTP server for outboxd's tests (aiosmtpd): listens on 127.0.0.1:PORT
and stores each message it accepts as DIR/NNNNNN.eml (written, then renamed).

If DIR/.delay holds a number, each DATA answer waits that many seconds after
the message is stored (a server that received the mail but stalls before it
says so: a client killed meanwhile has sent it without knowing); if
DIR/.refuse exists, DATA answers 451 (a server that is up but fails sends);
if DIR/.reject exists, 550 (the mail refused for good); if DIR/.slow holds a
number, each MAIL, RCPT and DATA answer waits that many seconds (a slow server,
on which a whole send outlasts the client's deadline though no step does).
Usage: smtp-sink.py PORT DIR
"""
import asyncio
import itertools
import os
import sys

from aiosmtpd.controller import Controller


class Store:
    def __init__(self, directory):
        self.dir = directory
        # Numbering goes on after a restart, so earlier mails are kept.
        stored = [int(n[:6]) for n in os.listdir(directory) if n.endswith(".eml")]
        self.seq = itertools.count(max(stored, default=0) + 1)

    async def slow(self):
        try:
            with open(os.path.join(self.dir, ".slow")) as f:
                await asyncio.sleep(float(f.read().strip() or 0))
        except (OSError, ValueError):
            pass

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        await self.slow()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        await self.slow()
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        await self.slow()
        if os.path.exists(os.path.join(self.dir, ".reject")):
            return "550 5.7.1 rejected for the test"
        if os.path.exists(os.path.join(self.dir, ".refuse")):
            return "451 4.3.0 refusing for the test"
        n = next(self.seq)
        tmp = os.path.join(self.dir, f".{n:06d}.tmp")
        with open(tmp, "wb") as f:
            f.write(b"X-Envelope-To: " + ", ".join(envelope.rcpt_tos).encode() + b"\r\n")
            f.write(envelope.original_content)
        os.rename(tmp, os.path.join(self.dir, f"{n:06d}.eml"))
        try:
            with open(os.path.join(self.dir, ".delay")) as f:
                await asyncio.sleep(float(f.read().strip() or 0))
        except (OSError, ValueError):
            pass
        return "250 2.0.0 stored"


def main():
    port, directory = int(sys.argv[1]), sys.argv[2]
    os.makedirs(directory, exist_ok=True)
    controller = Controller(Store(directory), hostname="127.0.0.1", port=port)
    controller.start()
    print(f"smtp-sink listening on 127.0.0.1:{port}", flush=True)
    try:
        asyncio.run(asyncio.Event().wait())
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
