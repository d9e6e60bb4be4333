"""Worked examples of the three handler shapes (see docs/handlers.md).

Run them with examples/handlers.toml:

    preforkd run -c examples/handlers.toml
    printf 'PING\r\nhello\r\n' | nc -q1 127.0.0.1 7100
"""

import time

import preforkd


# 1. A line function: one line in, one reply out. The fast path.
def ping(line: str) -> preforkd.Reply:
    if line == "PING":
        return "+PONG"
    if line.upper() == "QUIT":
        return preforkd.Close("+BYE")
    return line


# 2. A LineHandler: one instance per connection, so it can keep state.
class Counter(preforkd.LineHandler):
    """Greets, numbers every line, and says how many it saw when you quit."""

    started = 0.0

    @classmethod
    def worker_init(cls) -> None:
        # Runs once per worker after fork: open connections to databases here.
        cls.started = time.time()

    def on_connect(self) -> preforkd.Reply:
        self.count = 0
        return f"+OK counter ready (worker up since {time.strftime('%H:%M:%S', time.gmtime(self.started))} UTC)"

    def on_line(self, line: str) -> preforkd.Reply:
        if line.lower() == "quit":
            return preforkd.Close(f"+BYE after {self.count} lines")
        self.count += 1
        return f"{self.count}: {line}"


# 3. A connection handler: owns the connection (here, a line-oriented upper-caser
#    that reads with conn.readline() and writes with conn.write_line()).
@preforkd.connection_handler
def shout(conn: preforkd.Connection) -> None:
    conn.write_line("+OK I will shout back; an empty line ends it")
    while True:
        line = conn.readline()
        if not line:  # None at end of input, "" for an empty line
            return
        conn.write_line(line.upper())
