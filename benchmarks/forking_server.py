"""perlipc's fork-per-connection server: socketserver.ForkingTCPServer.

Usage: python forking_server.py [--host 127.0.0.1] [--port 0]
Prints the bound port on stdout, then serves until SIGTERM/SIGINT.
Protocol: "PING" -> "+PONG", any other line echoed; LF or CRLF in, CRLF out.
"""
import argparse
import signal
import socketserver
import sys


class Handler(socketserver.StreamRequestHandler):
    disable_nagle_algorithm = True  # TCP_NODELAY, like the other peers

    def handle(self):
        for raw in self.rfile:
            line = raw.rstrip(b"\r\n")
            self.wfile.write(b"+PONG\r\n" if line == b"PING" else line + b"\r\n")
            self.wfile.flush()


class Server(socketserver.ForkingTCPServer):
    allow_reuse_address = True
    request_queue_size = 1024
    block_on_close = False
    max_children = 1024  # default 40 would throttle accept() with 32 clients less than it looks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    server = Server((args.host, args.port), Handler)
    print(server.server_address[1], flush=True)

    def stop(signum, frame):
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
