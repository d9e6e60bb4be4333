"""The floor: a naive stdlib pre-fork server (bind, listen, fork N children on accept()).

Usage: python naive_prefork.py [--host 127.0.0.1] [--port 0] [--workers 4]
Prints the bound port on stdout, then serves until SIGTERM/SIGINT.
Protocol: "PING" -> "+PONG", any other line echoed; LF or CRLF in, CRLF out.
"""
import argparse
import os
import signal
import socket
import sys


def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buf += data
        out = []
        while (i := buf.find(b"\n")) >= 0:
            line, buf = buf[:i].rstrip(b"\r"), buf[i + 1:]
            out.append(b"+PONG\r\n" if line == b"PING" else line + b"\r\n")
        if out:
            conn.sendall(b"".join(out))


def child(sock):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    while True:
        conn, _ = sock.accept()
        try:
            serve(conn)
        except OSError:
            pass
        finally:
            conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    pids = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            child(sock)
            os._exit(0)
        pids.append(pid)
    print(sock.getsockname()[1], flush=True)

    def stop(signum, frame):
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            os.waitpid(pid, 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
