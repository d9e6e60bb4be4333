"""The preforkd benchmark handler: "PING" -> "+PONG", any other line echoed.

preforkd's line-function handler API: one decoded line without its terminator in, the
reply line out (preforkd adds CRLF). Configured as handler = "pingpong:handle".
"""


def handle(line: str) -> str:
    if line == "PING":
        return "+PONG"
    return line
