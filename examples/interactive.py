#!/usr/bin/env python3
"""perlipc's interactive server, as a preforkd ``command`` service.

perlipc ("Interactive Client with IO::Socket", "A Bigger Server") shows a server
that greets the client, prompts ``Command?`` and answers ``date``, ``help`` and
``quit``. Here the protocol lives in a plain program that reads stdin and writes
stdout; preforkd execs it once per connection with both bound to the client
socket (inetd style), so the program knows nothing about sockets.

Lines in may end in CRLF or LF; lines out end in CRLF. Try it:

    preforkd run -c examples/interactive.toml
    nc 127.0.0.1 7001            # or: socat - TCP:127.0.0.1:7001,crlf
"""

import os
import sys
import time

COMMANDS = {
    "date": "print the date and time (UTC)",
    "help": "list the commands",
    "quit": "close the connection",
}


def say(text: str) -> None:
    sys.stdout.write(text + "\r\n")
    sys.stdout.flush()


def main() -> int:
    peer = os.environ.get("TCPREMOTEIP", "a local client")
    say(f"Welcome, {peer}; type help for the command list.")
    while True:
        sys.stdout.write("Command? ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:  # the client went away
            return 0
        word = line.strip().lower()
        if not word:
            continue
        if word == "quit":
            say("Bye.")
            return 0
        if word == "date":
            say(time.strftime("%a %b %d %H:%M:%S %Y UTC", time.gmtime()))
        elif word == "help":
            for name, text in COMMANDS.items():
                say(f"  {name:<5} {text}")
        else:
            say(f"Unknown command {word!r}; try help.")


if __name__ == "__main__":
    sys.exit(main())
