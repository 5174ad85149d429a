"""sdgate boot client: type a prompt, get a PNG. Needs nothing but Python 3.9+.

    python client/boot.py "a red fox in the snow" --out images/
    python client/boot.py                      # interactive: one prompt per line, `exit` quits
    python client/boot.py "as a watercolour" --init photo.png --strength 0.6   # img2img
    python client/boot.py "a red door" --init house.jpg --mask door-mask.png   # inpainting

stdout gets exactly one line per saved image, its path, so scripts can use it; progress and
errors go to stderr. Exit status: 0 done, 1 the server or the network failed, 2 invalid input.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import select
import socket
import ssl
import sys
import time
import unicodedata
from typing import Any, Callable, Dict, List, Optional, Tuple

if not __package__:  # run as a script: make `client` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from client import protocol  # noqa: E402
from client.protocol import GenerationRequest, ImageReply, InvalidRequest, ProtocolError  # noqa: E402

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 5555
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_WORDS = ("exit", "quit")
PROMPT = "prompt> "
SLUG_CHARS = 40
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# After these the byte stream cannot be trusted (the server closes it too), or, for a timeout, an
# answer may still be on its way: the next request gets a fresh connection.
DROP_CONNECTION_CODES = (protocol.E_BAD_FRAME, protocol.E_FRAME_TOO_LARGE, protocol.E_UNSUPPORTED_VERSION,
                         protocol.E_TIMEOUT)
FLAGS = {"prompt": "the prompt", "negative_prompt": "--negative", "width": "--width", "height": "--height",
         "steps": "--steps", "guidance_scale": "--guidance", "seed": "--seed", "scheduler": "--scheduler",
         "model": "--model", "token": "--token", "init_image": "--init", "mask": "--mask",
         "strength": "--strength", "loras": "--lora"}
ADVICE = {
    protocol.E_BUSY: "the server is busy with other generations; retry in a few seconds",
    protocol.E_RATE_LIMITED: "too many requests from this machine; slow down and retry",
    protocol.E_UNAVAILABLE: "the server cannot reach its task queue right now; retry shortly",
    protocol.E_UNAUTHORIZED: "the server wants its shared token: pass --token or set SDGATE_TOKEN",
    protocol.E_INTERNAL: "the worker failed; retry, and tell the server's operator if it persists",
}


class ClientError(Exception):
    """A failure explained for the user; `exit_code` is what one-shot mode exits with."""

    def __init__(self, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.exit_code = EXIT_INVALID if code == protocol.E_INVALID_REQUEST else EXIT_FAILED


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line; the prompt is optional (none: interactive mode)."""
    parser = argparse.ArgumentParser(
        prog="boot.py", description="Ask an sdgate server for images.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The default model, `demo`, draws one or two coloured shapes on a background, e.g.:\n"
               '  python3 boot.py "a large red circle in the centre on a white background"\n'
               '  python3 boot.py "a small blue triangle on the left on a yellow background"\n'
               '  python3 boot.py "a green square at the top and an orange cross at the bottom on a black background"\n'
               "colours: red green blue yellow purple orange white black; shapes: circle square triangle cross;\n"
               "places: on the left, on the right, at the top, at the bottom, in the centre; sizes: small large.")
    parser.add_argument("prompt", nargs="*", help="what to draw; leave out for the interactive prompt")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"server address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"server port (default {DEFAULT_PORT})")
    parser.add_argument("--out", default="images", help="folder for the PNGs (default: images)")
    parser.add_argument("--width", type=int, help="multiple of 8 (default: the model's)")
    parser.add_argument("--height", type=int, help="multiple of 8 (default: the model's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, help="default: derived from the prompt and settings")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--scheduler", help=", ".join(protocol.SCHEDULERS) + " (default: the model's)")
    parser.add_argument("--model", help="a model the server offers (default: the server's default; see --models)")
    parser.add_argument("--models", action="store_true", help="list the server's models and exit")
    parser.add_argument("--previews", metavar="DIR", help="save live previews of the denoising into DIR")
    parser.add_argument("--preview-every", type=int, default=5, help="a preview every N steps (default 5)")
    parser.add_argument("--token", default=os.environ.get("SDGATE_TOKEN"), help="shared token (default $SDGATE_TOKEN)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one image (default 600)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to connect (default 10)")
    parser.add_argument("--tls", action="store_true", help="talk TLS (the server has tls_certfile set)")
    parser.add_argument("--cacert", help="PEM file of the CA (or self-signed certificate) to trust; implies --tls")
    parser.add_argument("--init", metavar="PATH", help="img2img: start from this PNG, JPEG or WebP (the output "
                        "keeps its size, fitted to the model, unless --width/--height say otherwise)")
    parser.add_argument("--strength", type=float, metavar="S", help="with --init: how far to move from it, in (0, 1] "
                        f"(default {protocol.DEFAULT_STRENGTH}; {protocol.DEFAULT_INPAINT_STRENGTH} with --mask)")
    parser.add_argument("--mask", metavar="PATH", help="with --init: inpainting mask of the init image's size "
                        "(white repaints, black keeps)")
    parser.add_argument("--lora", action="append", metavar="NAME[:WEIGHT]", type=parse_lora, dest="loras",
                        help="apply a LoRA the model offers (see --models), at WEIGHT (default 1); repeatable")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is outside 1..65535")
    if not (args.timeout > 0 and args.connect_timeout > 0):  # also refuses NaN
        parser.error("--timeout and --connect-timeout must be positive numbers of seconds")
    if args.init is None:
        if args.strength is not None:
            parser.error("--strength needs --init: it says how far to move from the init image")
        if args.mask is not None:
            parser.error("--mask needs --init: it marks which part of the init image to repaint")
    # Read once here, so a bad file is refused before connecting and every prompt reuses the bytes.
    try:
        args.init_image = None if args.init is None else read_image("--init", args.init)
        args.mask_image = None if args.mask is None else read_image("--mask", args.mask)
    except ClientError as exc:  # a file problem, not a usage one: no usage text, as main() prints errors
        parser.exit(EXIT_INVALID, f"error: {exc}\n")
    return args


def parse_lora(text: str) -> Tuple[str, float]:
    """`NAME` or `NAME:WEIGHT` of --lora as (name, weight); argparse reports the error."""
    name, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        value = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight after ':' must be a number, e.g. ink:0.8") from None
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: name the LoRA, e.g. ink or ink:0.8")
    return name, value


def read_image(option: str, path: str) -> bytes:
    """The bytes of the image file `option` names, at most MAX_IMAGE_BYTES of PNG, JPEG or WebP;
    ClientError otherwise. A file over the cap is refused from its size, before it is read."""
    limit = protocol.MAX_IMAGE_BYTES
    too_large = (f"{option} {path!r} is over the {limit}-byte ({limit // 2**20} MiB) limit for an image; "
                 "scale it down or save it as JPEG")
    try:
        if os.stat(path).st_size > limit:
            raise ClientError(too_large, protocol.E_INVALID_REQUEST)
        with open(path, "rb") as file:
            data = file.read(limit + 1)  # bounded: a pipe or a growing file can hold more than stat said
    except OSError as exc:
        raise ClientError(f"cannot read {option} {path!r}: {exc.strerror or exc}", protocol.E_INVALID_REQUEST) from None
    if len(data) > limit:
        raise ClientError(too_large, protocol.E_INVALID_REQUEST)
    try:
        protocol.check_image_bytes(option, data)  # the server's own check, so the words match
    except InvalidRequest as exc:
        raise ClientError(f"{option} {path!r} {exc.message}", protocol.E_INVALID_REQUEST) from None
    return data


def build_request(prompt: str, args: argparse.Namespace) -> GenerationRequest:
    """The request for `prompt`, validated here so bad input never leaves the machine."""
    request = GenerationRequest(prompt=prompt, negative_prompt=args.negative, width=args.width, height=args.height,
                                steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                scheduler=args.scheduler, model=args.model, init_image=args.init_image,
                                mask=args.mask_image, strength=args.strength,
                                loras=tuple(args.loras) if args.loras else None)
    try:
        request.validate()
    except InvalidRequest as exc:
        # The same words the server would answer with.
        error = ProtocolError(protocol.E_INVALID_REQUEST, str(exc), field=exc.field)
        raise ClientError(explain(error, f"{args.host}:{args.port}"), error.code) from None
    return request


def explain(exc: ProtocolError, where: str) -> str:
    """One sentence for the user: what went wrong and what to do about it."""
    exc = ProtocolError(clean_text(exc.code, 40), clean_text(exc.message), exc.field and clean_text(exc.field, 40))
    if exc.code == protocol.E_INVALID_REQUEST:
        hint = f" (set by {FLAGS[exc.field]})" if exc.field in FLAGS else ""
        named = exc.message if not exc.field or exc.message.startswith(exc.field) else f"{exc.field}: {exc.message}"
        return f"invalid request: {named}{hint}"
    if exc.code == protocol.E_TIMEOUT:
        return (f"timeout: {exc.message}; the image may still be finishing on the server: retry later "
                "(it will come from the cache), or wait longer with --timeout")
    if exc.code in (protocol.E_BAD_FRAME, protocol.E_UNSUPPORTED_VERSION, protocol.E_FRAME_TOO_LARGE):
        return f"{exc.code}: {exc.message}; is {where} an sdgate server of the same version as this client?"
    advice = ADVICE.get(exc.code)
    return f"{exc.code}: {exc.message}" + (f" ({advice})" if advice else "")


_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-~])|\x9b[0-?]*[ -/]*[@-~]")


def clean_text(text: Any, limit: int = 500) -> str:
    """Server text made safe for a terminal: escape sequences and control characters removed
    (they could recolour, retitle or rewrite the user's screen), and at most `limit` characters."""
    text = _ESCAPES.sub("", str(text))
    return "".join(c if c.isprintable() else " " for c in text if c not in "\x1b\x9b")[:limit]


class Progress:
    """Elapsed time and the STATUS states on stderr: one line redrawn with \\r on a TTY, plain lines otherwise."""

    def __init__(self, stream: Any = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self.started = time.monotonic()
        self.states: List[str] = []
        self._drawn = 0
        self._detail = ""  # the step bar, queue position and ETA of the latest STATUS
        self._printed = 0.0

    def __call__(self, status: Any) -> None:
        state = status.get("state") if isinstance(status, dict) else None
        if state != "waiting":
            # Printable and short: the text comes from the network and goes to a terminal.
            text = "".join(c for c in ("" if state is None else str(state)) if c.isprintable())[:40] or "?"
            detail = _detail(status) if isinstance(status, dict) else ""
            changed = not self.states or self.states[-1] != text
            if changed:
                self.states.append(text)
            if not self.tty and (changed or detail != self._detail and time.monotonic() - self._printed >= 1.0):
                self._printed = time.monotonic()
                self._write(f"  {text}{' ' + detail if detail else ''} ({self.elapsed():.1f} s)\n")
            self._detail = detail
        if self.tty:
            self._draw(f"  {' > '.join(self.states) or 'sent'} {self._detail} ... {self.elapsed():.1f} s")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def finish(self, ok: bool) -> None:
        """Replace the live line with a summary (on success) so errors and paths print cleanly."""
        if self.tty:
            self._draw("")
            self._write("\r")
        if ok:
            self._write(f"  done in {self.elapsed():.1f} s ({' > '.join(self.states) or 'no status'})\n")

    def _draw(self, text: str) -> None:
        self._write("\r" + text.ljust(self._drawn))
        self._drawn = len(text)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed: progress is a nicety
            pass


def _detail(status: Any) -> str:
    """`[#####.....] 5/10  queue 3  ETA 12 s` from a STATUS's optional fields (numbers only)."""
    parts = []
    step, steps = status.get("step"), status.get("steps")
    if isinstance(step, int) and isinstance(steps, int) and steps > 0:
        filled = max(0, min(20, round(20 * step / steps)))
        parts.append(f"[{'#' * filled}{'.' * (20 - filled)}] {step}/{steps}")
    position = status.get("queue_position")
    if isinstance(position, int) and not isinstance(position, bool):
        parts.append(f"queue {position + 1}")
    eta = status.get("eta_s")
    if isinstance(eta, (int, float)) and not isinstance(eta, bool) and 0 <= eta < 1e6:
        parts.append(f"ETA {eta:.0f} s")
    return "  ".join(parts)


class BootClient:
    """One connection to an sdgate server, reused for requests in sequence and reopened when it drops."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: Optional[str] = None,
                 timeout: float = 600.0, connect_timeout: float = 10.0, tls: bool = False,
                 cacert: Optional[str] = None):
        self.host, self.port, self.token = host, port, token
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.tls = None
        if tls or cacert:  # the server's certificate is always verified, against --cacert or the system CAs
            self.tls = ssl.create_default_context(cafile=cacert)
            self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._sock: Optional[socket.socket] = None

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self) -> socket.socket:
        """The open connection, or a new one; a connection the server closed while idle is replaced."""
        if self._sock is not None and _closed_by_peer(self._sock):
            self.close()
        if self._sock is None:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            except OSError as exc:
                raise ClientError(f"cannot reach the sdgate server at {self.where}: is it running? "
                                  f"start it with `sdgate up` ({exc.strerror or exc})") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_hostname=self.host)
                except (ssl.SSLError, OSError) as exc:
                    sock.close()
                    raise ClientError(f"TLS with {self.where} failed ({exc}); check --cacert, and that the server "
                                      "has TLS on (drop --tls if it has not)") from None
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def list_models(self) -> dict:
        """The server's model listing (OpenAI list shape with sdgate's defaults, limits, live workers)."""
        try:
            return protocol.list_models(self.connect(), token=self.token, timeout=self.timeout)
        except ProtocolError as exc:
            self.close()
            raise ClientError(explain(exc, self.where), exc.code) from None
        except OSError as exc:
            self.close()
            raise ClientError(f"lost the connection to the sdgate server at {self.where} ({exc})") from None

    def generate(self, request: GenerationRequest, previews: int = 0,
                 on_preview: Optional[Callable[[Dict[str, Any]], None]] = None) -> ImageReply:
        """The image for `request`; on a lost connection, reconnects and sends it once more.

        Resending is safe: the server answers identical requests from one generation or the cache.
        Error answers (invalid_request, unauthorized, busy, ...) are never retried here.
        """
        for attempt in (1, 2):
            progress = Progress()
            try:
                reply = protocol.exchange(self.connect(), request, token=self.token, timeout=self.timeout,
                                          on_status=progress, poll=0.25 if progress.tty else 1.0,
                                          previews=previews, on_preview=on_preview)
                _check_reply(reply)
            except ProtocolError as exc:
                progress.finish(ok=False)
                if exc.code in DROP_CONNECTION_CODES:
                    self.close()
                raise ClientError(explain(exc, self.where), exc.code) from None
            except OSError as exc:  # reset, broken pipe, or closed before the answer (ConnectionError)
                progress.finish(ok=False)
                self.close()
                if attempt == 2:
                    raise ClientError(f"lost the connection to the sdgate server at {self.where} twice ({exc}); "
                                      "is it restarting? retry in a few seconds") from None
                print(f"  connection lost ({exc}); reconnecting and sending the request again", file=sys.stderr)
                continue
            except BaseException:  # e.g. Ctrl-C: exchange() sent CANCEL; start afresh next time
                self.close()
                raise
            progress.finish(ok=True)
            return reply
        raise AssertionError("unreachable")


def _check_reply(reply: ImageReply) -> None:
    if not isinstance(reply.meta, dict):
        raise ProtocolError(protocol.E_BAD_FRAME, "IMAGE metadata is not a JSON object")
    if not reply.png.startswith(PNG_SIGNATURE):
        raise ProtocolError(protocol.E_BAD_FRAME, "IMAGE frame does not carry a PNG")


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the server has closed or reset an idle connection (it does after its idle timeout)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        # Readable while idle: either EOF, or an ERROR frame the server sent before closing (kept for exchange()).
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def slugify(prompt: str) -> str:
    """At most SLUG_CHARS of [a-z0-9-] from the prompt; 'image' when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:SLUG_CHARS].strip("-") or "image"


def image_name(prompt: str, reply: ImageReply) -> str:
    """`<prompt slug>-<first 12 hex of the cache key>.png` (the PNG's own hash if the key is missing)."""
    key = str(reply.meta.get("key", "")).lower()
    if not re.match(r"^[0-9a-f]{12}", key):  # the name must not be steerable by the server
        key = hashlib.sha256(reply.png).hexdigest()
    return f"{slugify(prompt)}-{key[:12]}.png"


def save_image(reply: ImageReply, prompt: str, out: str) -> str:
    """Write the PNG under `out` atomically (a temporary file, then os.replace); return its path."""
    os.makedirs(out, exist_ok=True)
    name = image_name(prompt, reply)
    path = os.path.join(out, name)
    tmp = os.path.join(out, f".{name}.{os.getpid()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(reply.png)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


class PreviewSaver:
    """Writes each PREVIEW frame's PNG into a folder as <slug>-step<N>.png (--previews DIR)."""

    def __init__(self, folder: str, prompt: str):
        self.folder, self.slug = folder, slugify(prompt)
        os.makedirs(folder, exist_ok=True)

    def __call__(self, preview: Dict[str, Any]) -> None:
        step = preview.get("step") if isinstance(preview.get("step"), int) else 0
        try:
            png = base64.b64decode(str(preview.get("png_b64", "")), validate=True)
        except ValueError:
            return
        if png.startswith(b"\x89PNG"):
            with open(os.path.join(self.folder, f"{self.slug}-step{step:03d}.png"), "wb") as out:
                out.write(png)


def run_once(client: BootClient, prompt: str, args: argparse.Namespace) -> str:
    """Ask for one image, save it, print its path on stdout; raises ClientError."""
    request = build_request(prompt, args)
    saver = PreviewSaver(args.previews, prompt) if args.previews else None
    reply = client.generate(request, previews=args.preview_every if saver else 0, on_preview=saver)
    try:
        path = save_image(reply, prompt, args.out)
    except OSError as exc:
        raise ClientError(f"cannot save the image under {args.out!r}: {exc.strerror or exc}; "
                          "pick another folder with --out") from None
    print(path, flush=True)
    return path


def format_models(listing: dict) -> str:
    """One line per model: name, default marker, live workers, default size and steps, limits."""
    lines = []
    for model in listing.get("data", []):
        if not isinstance(model, dict):
            continue
        d, lim = model.get("defaults") or {}, model.get("limits") or {}
        live = model.get("live_workers")
        text = (f"{_printable(model.get('id'))}{' (default)' if model.get('default') else ''}: "
                f"{'?' if live is None else _printable(live)} live worker(s); defaults "
                f"{_printable(d.get('width'))}x{_printable(d.get('height'))}, {_printable(d.get('steps'))} steps, "
                f"{_printable(d.get('scheduler'))}, guidance {_printable(d.get('guidance_scale'))}; limits "
                f"side <= {_printable(lim.get('max_side'))}, steps <= {_printable(lim.get('max_steps'))}")
        loras = model.get("loras")
        if isinstance(loras, list) and loras:
            text += "; LoRAs (--lora): " + ", ".join(_printable(name) for name in loras)
        lines.append(text)
    return "\n".join(lines) if lines else "the server lists no models"


def _printable(value: Any) -> str:
    """Network text made safe for a terminal: printable and short."""
    return "".join(c for c in str(value) if c.isprintable())[:80]


def read_prompt() -> str:
    """The next line typed or piped in; EOFError at the end of input."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input(), where available
        except ImportError:
            pass
        return input(PROMPT)
    if sys.stdin.isatty():  # stdout is redirected: keep it for paths
        sys.stderr.write(PROMPT)
        sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


def run_interactive(client: BootClient, args: argparse.Namespace) -> int:
    """Prompt loop: one image per line over one reused connection; `exit`, `quit` or EOF ends it."""
    if sys.stdin.isatty():
        print(f"sdgate at {client.where}: type a prompt, or `exit` to quit", file=sys.stderr)
    while True:
        try:
            prompt = read_prompt().strip()
        except (EOFError, KeyboardInterrupt):
            if sys.stdin.isatty():
                print(file=sys.stderr)
            return EXIT_OK
        if not prompt:
            continue
        if prompt.lower() in EXIT_WORDS:
            return EXIT_OK
        try:
            run_once(client, prompt, args)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:  # cancels this image, not the session
            client.close()
            print("\n  cancelled", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        client = BootClient(args.host, args.port, args.token, args.timeout, args.connect_timeout,
                            tls=args.tls, cacert=args.cacert)
    except (OSError, ssl.SSLError) as exc:
        print(f"error: cannot read --cacert {args.cacert!r}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        if args.models:
            print(format_models(client.list_models()), flush=True)
            return EXIT_OK
        if not args.prompt:
            build_request("flag check", args)  # refuse bad flags before the first prompt is typed
            return run_interactive(client, args)
        run_once(client, " ".join(args.prompt), args)
        return EXIT_OK
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        client.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
