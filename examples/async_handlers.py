"""Worked examples of handlers for event-driven workers (worker_connections > 1).

Run them with examples/async.toml:

    preforkd run -c examples/async.toml
    printf 'WAIT 1 hello\r\n' | nc -q2 127.0.0.1 7200      # answered after 1 s
    nc 127.0.0.1 7201                                      # a chat room; open two
"""

import asyncio
from typing import ClassVar, Set

import preforkd


# 1. An async line function: it may await (a backend call, a timer) without holding
#    up the worker's other connections. Here the "backend" is a timer.
async def delayed(line: str) -> preforkd.Reply:
    """``WAIT SECONDS TEXT`` answers TEXT after SECONDS (at most 10); anything else is echoed."""
    word, _, rest = line.partition(" ")
    if word.upper() == "WAIT":
        seconds, _, text = rest.partition(" ")
        try:
            delay = min(float(seconds), 10.0)
        except ValueError:
            return "-ERR usage: WAIT SECONDS TEXT"
        await asyncio.sleep(delay)
        return text
    if word.upper() == "QUIT":
        return preforkd.Close("+BYE")
    return line


# 2. A LineHandler with state shared by the connections of one worker: a chat room.
#    conn.write_line() pushes a line to a client at any time (buffered, never blocking).
#    The room is per worker process: clients of different workers do not see each
#    other (use workers = 1, or a backend such as Redis, to share one room).
class Chat(preforkd.LineHandler):
    """Every line is sent to the other clients of this worker's room."""

    room: ClassVar[Set["Chat"]] = set()

    def on_connect(self) -> preforkd.Reply:
        Chat.room.add(self)
        self.say(f"* {self.conn.peer} joined")
        return f"+OK {len(Chat.room)} here; type lines, /quit to leave"

    async def on_line(self, line: str) -> preforkd.Reply:
        if line == "/quit":
            return preforkd.Close("+BYE")
        self.say(f"{self.conn.peer}: {line}")
        return None

    def on_close(self) -> None:
        Chat.room.discard(self)
        self.say(f"* {self.conn.peer} left")

    def say(self, text: str) -> None:
        for other in Chat.room:
            if other is not self:
                other.conn.write_line(text)
