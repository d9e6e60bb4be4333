"""A single-process asyncio line server (streams API, default event loop).

Usage: python asyncio_server.py [--host 127.0.0.1] [--port 0]
Prints the bound port on stdout, then serves until SIGTERM/SIGINT.
Protocol: "PING" -> "+PONG", any other line echoed; LF or CRLF in, CRLF out.
"""
import argparse
import asyncio
import signal
import socket


async def handle(reader, writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            raw = await reader.readline()
            if not raw:
                break
            line = raw.rstrip(b"\r\n")
            writer.write(b"+PONG\r\n" if line == b"PING" else line + b"\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    server = await asyncio.start_server(handle, args.host, args.port, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
