"""sdgate boot client: type a prompt, get a PNG. Needs nothing but Python 3.9+.

    python client/boot.py "a red fox in the snow" --out images/
    python client/boot.py                      # interactive: one prompt per line, `exit` quits

Prints the path of each saved PNG on stdout; progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import tempfile
import time
from typing import List, Optional

if not __package__:  # run as a script: make `client` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from client import protocol  # noqa: E402
from client.protocol import GenerationRequest, ImageReply, InvalidRequest, ProtocolError  # noqa: E402

EXIT_WORDS = ("exit", "quit")
ADVICE = {
    protocol.E_BUSY: "the server is busy with other generations; try again in a few seconds",
    protocol.E_TIMEOUT: "the image did not arrive in time; try again (it may be ready from the cache by then)",
    protocol.E_UNAUTHORIZED: "the server wants a token: pass --token or set SDGATE_TOKEN",
    protocol.E_RATE_LIMITED: "too many requests from this machine; slow down",
    protocol.E_UNAVAILABLE: "the server cannot reach its workers right now; try again shortly",
}


class ClientError(Exception):
    """Something the user should read; the message says what to do."""


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="boot.py", description="Ask an sdgate server for an image.")
    parser.add_argument("prompt", nargs="*", help="what to draw; leave out for the interactive prompt")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--out", default="images", help="folder for the PNGs (default: images)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--scheduler", default="default", choices=protocol.SCHEDULERS)
    parser.add_argument("--model", default=protocol.DEFAULT_MODEL)
    parser.add_argument("--token", default=os.environ.get("SDGATE_TOKEN"), help="shared token (or SDGATE_TOKEN)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one image")
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    return parser.parse_args(argv)


def build_request(prompt: str, args: argparse.Namespace) -> GenerationRequest:
    """A validated request; bad input is refused here, before it leaves the machine."""
    request = GenerationRequest(prompt=prompt, negative_prompt=args.negative, width=args.width, height=args.height,
                                steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                scheduler=args.scheduler, model=args.model)
    try:
        request.validate()
    except InvalidRequest as exc:
        raise ClientError(f"invalid {exc.field}: {exc.message}") from None
    return request


class Progress:
    """Elapsed time and the server's STATUS on one stderr line (plain lines when not a TTY)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.state = "sending"

    def __call__(self, status: dict) -> None:
        if status.get("state") != "waiting":
            self.state = str(status.get("state"))
            if not self.tty:
                print(f"  {self.state} ({time.monotonic() - self.started:.1f} s)", file=sys.stderr)
        if self.tty:
            print(f"\r  {self.state} ... {time.monotonic() - self.started:5.1f} s", end="", file=sys.stderr,
                  flush=True)

    def done(self) -> None:
        if self.tty:
            print("\r" + " " * 40 + "\r", end="", file=sys.stderr, flush=True)


class BootClient:
    """One connection to the server, reused for many requests, reopened when it drops."""

    def __init__(self, host: str, port: int, token: Optional[str], timeout: float, connect_timeout: float):
        self.host, self.port, self.token = host, port, token
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._sock: Optional[socket.socket] = None

    def connect(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            except OSError as exc:
                raise ClientError(f"cannot reach the sdgate server at {self.host}:{self.port} ({exc.strerror or exc}):"
                                  " is it running? start it with `sdgate up`") from None
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def generate(self, request: GenerationRequest) -> ImageReply:
        """The image, retrying once (on a new connection) if the connection is lost."""
        for attempt in (1, 2):
            progress = Progress()
            try:
                reply = protocol.exchange(self.connect(), request, token=self.token, timeout=self.timeout,
                                          on_status=progress)
                progress.done()
                return reply
            except ProtocolError as exc:
                progress.done()
                self.close()  # the server may have closed its end after an error
                raise ClientError(explain(exc)) from None
            except (ConnectionError, OSError) as exc:
                progress.done()
                self.close()
                if attempt == 2:
                    raise ClientError(f"lost the connection to {self.host}:{self.port} twice ({exc}); "
                                      "is the server restarting? try again shortly") from None
                print("  connection lost; retrying once", file=sys.stderr)
        raise AssertionError("unreachable")


def explain(exc: ProtocolError) -> str:
    if exc.code == protocol.E_INVALID_REQUEST:
        return f"the server refused the request: {exc.message}"
    advice = ADVICE.get(exc.code)
    return f"{exc.code}: {exc.message}" + (f" ({advice})" if advice else "")


def save_image(reply: ImageReply, prompt: str, out: str) -> str:
    """Write the PNG atomically as <prompt slug>-<key prefix>.png under `out`; return its path."""
    os.makedirs(out, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-") or "image"
    path = os.path.join(out, f"{slug}-{str(reply.meta.get('key', 'unknown'))[:12]}.png")
    handle, tmp = tempfile.mkstemp(dir=out, suffix=".part")
    with os.fdopen(handle, "wb") as file:
        file.write(reply.png)
    os.replace(tmp, path)
    return path


def run_once(client: BootClient, prompt: str, args: argparse.Namespace) -> str:
    reply = client.generate(build_request(prompt, args))
    path = save_image(reply, prompt, args.out)
    print(path, flush=True)
    return path


def run_interactive(client: BootClient, args: argparse.Namespace) -> int:
    print(f"sdgate at {args.host}:{args.port}: type a prompt, or `exit` to quit", file=sys.stderr)
    while True:
        try:
            if sys.stdin.isatty():
                line = input("prompt> ")
            else:
                line = sys.stdin.readline()
                if not line:
                    return 0
        except (EOFError, KeyboardInterrupt):
            return 0
        prompt = line.strip()
        if not prompt:
            continue
        if prompt.lower() in EXIT_WORDS:
            return 0
        try:
            run_once(client, prompt, args)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    client = BootClient(args.host, args.port, args.token, args.timeout, args.connect_timeout)
    try:
        if not args.prompt:
            return run_interactive(client, args)
        run_once(client, " ".join(args.prompt), args)
        return 0
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
