"""The boot client against a scripted fake server (the real gateway is tested in tests/integration).

The client runs as `python client/boot.py` in a subprocess with an empty environment and another
working directory, which proves it needs nothing installed and nothing on PYTHONPATH.
"""

from __future__ import annotations

import ast
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest

from client import boot, protocol
from client.protocol import ConnectionClosed, GenerationRequest, ImageReply, ProtocolError

REPO = Path(__file__).resolve().parents[2]
BOOT = REPO / "client" / "boot.py"


def tiny_png(width: int = 2, height: int = 2, rgb: bytes = b"\xff\x80\x00") -> bytes:
    """A valid RGB PNG of one colour built with zlib alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + rgb * width for _ in range(height))
    return (boot.PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


PNG = tiny_png()
LISTING = {"object": "list", "data": [
    {"id": "tiny", "object": "model", "default": True, "live_workers": 1,
     "defaults": {"width": 64, "height": 64, "steps": 2, "scheduler": "default", "guidance_scale": 7.5},
     "limits": {"max_side": 2048, "max_steps": 150}},
    {"id": "sd15\x1b[31m", "object": "model", "default": False, "live_workers": 0,
     "defaults": {"width": 512, "height": 512, "steps": 25, "scheduler": "dpm++", "guidance_scale": 7.0},
     "limits": {"max_side": 1024, "max_steps": 60}, "loras": ["ink", "grain"]}]}
# handler(conn, request, token, number of this request) -> False to close the connection.
Handler = Callable[[socket.socket, GenerationRequest, Optional[str], int], Optional[bool]]


def send_image(conn: socket.socket, request: GenerationRequest) -> None:
    # What a gateway does: fill the model and its defaults (this fake server's catalogue is tiny's).
    normalized = request.with_defaults(request.model or "tiny", 64, 64, 2, 7.5, "default").normalized()
    meta = {"key": normalized.cache_key(), "seed": normalized.seed, "model": normalized.model,
            "width": normalized.width, "height": normalized.height, "steps": normalized.steps}
    conn.sendall(protocol.encode_image(meta, PNG))


def answer(conn, request, token, n):
    conn.sendall(protocol.encode_status(protocol.STATUS_QUEUED) + protocol.encode_status(protocol.STATUS_GENERATING))
    send_image(conn, request)


class FakeServer:
    """A tiny sdgate server on a free port that answers each REQUEST with `handler`."""

    def __init__(self, handler: Handler = answer, tls=None):
        self.handler = handler
        self.tls = tls  # an ssl.SSLContext: accepted connections speak TLS
        self.requests: List[Tuple[GenerationRequest, Optional[str]]] = []
        self.connections = 0
        self.stopped = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn.settimeout(5)
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                return
        with conn:
            while not self.stopped.is_set():
                try:
                    frame = protocol.read_frame(conn, frame_timeout=5, idle_timeout=30)
                    if frame.kind == protocol.LIST_MODELS:
                        conn.sendall(protocol.encode_models(LISTING))
                        continue
                    request, token = protocol.decode_request(frame)
                except (ConnectionClosed, ProtocolError, OSError):
                    return
                with self._lock:
                    self.requests.append((request, token))
                    number = len(self.requests)
                if self.handler(conn, request, token, number) is False:
                    return

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()


@pytest.fixture
def serve():
    servers = []

    def start(handler: Handler = answer, tls=None) -> FakeServer:
        servers.append(FakeServer(handler, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def run_boot(*args: str, port: int, out: Path, stdin: Optional[str] = None, env: Optional[dict] = None,
             python: str = sys.executable, timeout: float = 30) -> subprocess.CompletedProcess:
    """`python client/boot.py ARGS --port PORT --out OUT` with an empty environment, outside the repo."""
    return subprocess.run([python, str(BOOT), *args, "--port", str(port), "--out", str(out)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=dict(env or {}), cwd=str(out.parent))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# One-shot mode
# ---------------------------------------------------------------------------------------------

def test_one_shot_saves_the_png_and_prints_only_its_path(serve, tmp_path):
    server = serve()
    out = tmp_path / "images"
    result = run_boot("A Red Fox, in the snow!", port=server.port, out=out)
    assert result.returncode == 0, result.stderr
    key = GenerationRequest("A Red Fox, in the snow!").with_defaults("tiny", 64, 64, 2, 7.5, "default").cache_key()
    expected = out / f"a-red-fox-in-the-snow-{key[:12]}.png"
    assert result.stdout == f"{expected}\n"
    assert expected.read_bytes() == PNG
    assert sorted(p.name for p in out.iterdir()) == [expected.name]  # no temporary file left behind
    assert server.requests == [(GenerationRequest("A Red Fox, in the snow!"), None)]


def test_statuses_and_elapsed_time_go_to_stderr_as_plain_lines(serve, tmp_path):
    server = serve()
    result = run_boot("a red fox", port=server.port, out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    queued = next(i for i, line in enumerate(lines) if "queued" in line)
    generating = next(i for i, line in enumerate(lines) if "generating" in line)
    assert queued < generating and lines[queued].rstrip().endswith(" s)")
    assert "\r" not in result.stderr  # not a TTY: no redrawn line
    assert "done in" in result.stderr


def test_the_client_names_no_model_and_no_defaults_unless_asked(serve, tmp_path):
    server = serve()
    result = run_boot("a red fox", port=server.port, out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    sent = server.requests[0][0]
    assert (sent.model, sent.width, sent.height, sent.steps, sent.guidance_scale, sent.scheduler) == (None,) * 6


def test_models_flag_prints_what_the_server_offers(serve, tmp_path):
    server = serve()
    result = run_boot("--models", port=server.port, out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tiny (default): 1 live worker(s); defaults 64x64, 2 steps")
    assert lines[1].startswith("sd15[31m: 0 live worker(s); defaults 512x512, 25 steps, dpm++, guidance 7.0")
    assert "\x1b" not in result.stdout  # text from the network never reaches the terminal raw
    assert "side <= 1024, steps <= 60; LoRAs (--lora): ink, grain" in lines[1] and not server.requests
    assert "LoRAs" not in lines[0]


def test_flags_build_the_request_and_the_token_comes_from_the_environment(serve, tmp_path):
    server = serve()
    result = run_boot("owl", "at", "night", "--width", "128", "--height", "72", "--steps", "3", "--seed", "9",
                      "--guidance", "4.5", "--negative", "blur", "--scheduler", "ddim", "--model", "org/m-1",
                      port=server.port, out=tmp_path / "out", env={"SDGATE_TOKEN": "s3cret"})
    assert result.returncode == 0, result.stderr
    assert server.requests == [(GenerationRequest("owl at night", negative_prompt="blur", width=128, height=72,
                                                  steps=3, guidance_scale=4.5, seed=9, scheduler="ddim",
                                                  model="org/m-1"), "s3cret")]


def test_server_invalid_request_exits_non_zero_naming_the_field(serve, tmp_path):
    def refuse_model(conn, request, token, n):
        conn.sendall(protocol.encode_error(protocol.E_INVALID_REQUEST, "model: 'org/other' is not served here",
                                           field="model"))

    server = serve(refuse_model)
    result = run_boot("a red fox", "--model", "org/other", port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_INVALID
    assert "invalid request: model: 'org/other' is not served here (set by --model)" in result.stderr
    assert result.stdout == "" and len(server.requests) == 1  # never retried


def test_server_down_says_how_to_start_it(tmp_path):
    port = free_port()
    result = run_boot("a red fox", port=port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_FAILED and result.stdout == ""
    assert (f"cannot reach the sdgate server at 127.0.0.1:{port}: is it running? start it with `sdgate up`"
            in result.stderr)


def test_connection_dropped_once_is_retried_on_a_new_connection(serve, tmp_path):
    def drop_first(conn, request, token, n):
        if n == 1:
            conn.sendall(protocol.encode_status(protocol.STATUS_QUEUED))
            return False  # closed before the answer
        answer(conn, request, token, n)

    server = serve(drop_first)
    result = run_boot("a red fox", port=server.port, out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == PNG
    assert "reconnecting" in result.stderr
    assert server.connections == 2 and server.requests[0] == server.requests[1]


def test_connection_dropped_twice_gives_up(serve, tmp_path):
    server = serve(lambda conn, request, token, n: False)
    result = run_boot("a red fox", port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_FAILED and result.stdout == ""
    assert "lost the connection" in result.stderr and len(server.requests) == 2


@pytest.mark.parametrize("code, words", [
    (protocol.E_UNAUTHORIZED, "pass --token or set SDGATE_TOKEN"),
    (protocol.E_BUSY, "retry in a few seconds"),
    (protocol.E_RATE_LIMITED, "slow down"),
])
def test_error_answers_are_explained_and_not_retried(serve, tmp_path, code, words):
    server = serve(lambda conn, request, token, n: conn.sendall(protocol.encode_error(code, "nope")))
    result = run_boot("a red fox", port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_FAILED and result.stdout == ""
    assert f"{code}: nope" in result.stderr and words in result.stderr
    assert len(server.requests) == 1


def test_no_answer_within_timeout_is_a_timeout(serve, tmp_path):
    def stall(conn, request, token, n):
        conn.sendall(protocol.encode_status(protocol.STATUS_QUEUED))
        time.sleep(10)

    server = serve(stall)
    started = time.monotonic()
    result = run_boot("a red fox", "--timeout", "1", port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_FAILED and "timeout" in result.stderr and "--timeout" in result.stderr
    assert time.monotonic() - started < 8


def test_local_validation_refuses_before_connecting_with_the_servers_words(serve, tmp_path):
    server = serve()
    result = run_boot("a red fox", "--width", str(10**6), port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_INVALID and result.stdout == ""
    assert "width: 1000000 is outside 64..2048" in result.stderr and "--width" in result.stderr
    time.sleep(0.2)
    assert server.connections == 0
    # What a server would answer for the same request reads exactly the same.
    a, b = socket.socketpair()
    with a, b:
        a.sendall(protocol.encode_request(GenerationRequest("a red fox", width=10**6)))
        with pytest.raises(ProtocolError) as caught:
            protocol.decode_request(protocol.read_frame(b, frame_timeout=2))
    assert result.stderr.strip() == f"error: {boot.explain(caught.value, f'127.0.0.1:{server.port}')}"


def test_bad_flags_are_refused_before_the_first_prompt(serve, tmp_path):
    server = serve()
    result = run_boot("--scheduler", "warp", port=server.port, out=tmp_path / "out", stdin="a cat\n")
    assert result.returncode == boot.EXIT_INVALID and "scheduler" in result.stderr
    assert server.connections == 0


# ---------------------------------------------------------------------------------------------
# Init images: --init, --strength, --mask
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def pictures(tmp_path):
    """An init image and a mask of its size on disk: {"init": (path, bytes), "mask": (path, bytes)}."""
    files = {"init": ("photo.png", tiny_png(16, 16)), "mask": ("mask.png", tiny_png(16, 16, b"\xff\xff\xff"))}
    for name, data in files.values():
        (tmp_path / name).write_bytes(data)
    return {option: (str(tmp_path / name), data) for option, (name, data) in files.items()}


def test_init_mask_and_strength_travel_in_the_request(serve, tmp_path, pictures):
    server = serve()
    (init, init_bytes), (mask, mask_bytes) = pictures["init"], pictures["mask"]
    result = run_boot("a red door", "--init", init, "--mask", mask, "--strength", "0.6", port=server.port,
                      out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert server.requests == [(GenerationRequest("a red door", init_image=init_bytes, mask=mask_bytes,
                                                  strength=0.6), None)]
    assert server.requests[0][0].kind == "inpaint"
    assert Path(result.stdout.strip()).read_bytes() == PNG


def test_init_alone_leaves_strength_and_size_to_the_server(serve, tmp_path, pictures):
    server = serve()
    init, init_bytes = pictures["init"]
    result = run_boot("as a watercolour", "--init", init, port=server.port, out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    sent = server.requests[0][0]
    assert sent == GenerationRequest("as a watercolour", init_image=init_bytes) and sent.kind == "img2img"
    assert (sent.width, sent.height, sent.strength, sent.mask) == (None,) * 4
    key = sent.with_defaults("tiny", 64, 64, 2, 7.5, "default").cache_key()
    assert Path(result.stdout.strip()).name == f"as-a-watercolour-{key[:12]}.png"
    assert key != GenerationRequest("as a watercolour").with_defaults("tiny", 64, 64, 2, 7.5, "default").cache_key()


def test_interactive_reads_the_init_image_once_for_every_prompt(serve, tmp_path, pictures):
    server = serve()
    init, init_bytes = pictures["init"]
    result = run_boot("--init", init, "--strength", "0.5", port=server.port, out=tmp_path / "out",
                      stdin="a cat\na dog\n")
    assert result.returncode == 0 and "error" not in result.stderr, result.stderr
    assert len(result.stdout.splitlines()) == 2 and server.connections == 1
    assert [(r.prompt, r.init_image, r.strength) for r, _ in server.requests] == [
        ("a cat", init_bytes, 0.5), ("a dog", init_bytes, 0.5)]


@pytest.mark.parametrize("flags, words", [
    (["--strength", "0.5"], "--strength needs --init"),
    (["--mask", "MASK"], "--mask needs --init"),
])
def test_strength_or_mask_without_init_is_a_usage_error(serve, tmp_path, pictures, flags, words):
    server = serve()
    flags = [pictures["mask"][0] if flag == "MASK" else flag for flag in flags]
    result = run_boot("a red fox", *flags, port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_INVALID and result.stdout == ""
    assert words in result.stderr and "usage:" in result.stderr
    time.sleep(0.2)
    assert server.connections == 0


@pytest.mark.parametrize("option", ["--init", "--mask"])
def test_a_file_over_the_image_cap_is_refused_naming_the_option(serve, tmp_path, pictures, option):
    server = serve()
    big = tmp_path / "huge.png"
    with open(big, "wb") as file:  # sparse: a PNG signature, then a hole up to one byte over the cap
        file.write(boot.PNG_SIGNATURE)
        file.truncate(protocol.MAX_IMAGE_BYTES + 1)
    flags = ["--init", str(big)] if option == "--init" else ["--init", pictures["init"][0], "--mask", str(big)]
    result = run_boot("a red fox", *flags, port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_INVALID and result.stdout == ""
    assert f"error: {option} {str(big)!r} is over the {protocol.MAX_IMAGE_BYTES}-byte (4 MiB) limit" in result.stderr
    assert "usage:" not in result.stderr
    time.sleep(0.2)
    assert server.connections == 0


@pytest.mark.parametrize("option", ["--init", "--mask"])
@pytest.mark.parametrize("content", [b"GIF89a\x01\x00\x01\x00", b"a note, not a picture\n"])
def test_a_file_that_is_not_png_jpeg_or_webp_is_refused_naming_the_option(serve, tmp_path, pictures, option,
                                                                          content):
    server = serve()
    other = tmp_path / "other.gif"
    other.write_bytes(content)
    flags = ["--init", str(other)] if option == "--init" else ["--init", pictures["init"][0], "--mask", str(other)]
    result = run_boot("a red fox", *flags, port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_INVALID and result.stdout == ""
    assert f"error: {option} {str(other)!r} is not a PNG, JPEG or WebP image" in result.stderr
    time.sleep(0.2)
    assert server.connections == 0


def test_a_missing_file_and_a_bad_strength_are_refused_naming_the_option(serve, tmp_path, pictures):
    server = serve()
    missing = str(tmp_path / "no-such.png")
    result = run_boot("a red fox", "--init", missing, port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_INVALID
    assert f"cannot read --init {missing!r}: No such file or directory" in result.stderr
    result = run_boot("a red fox", "--init", pictures["init"][0], "--strength", "1.5", port=server.port,
                      out=tmp_path / "out")
    assert result.returncode == boot.EXIT_INVALID
    assert "invalid request: strength: 1.5 is outside (0, 1]" in result.stderr
    assert "(set by --strength)" in result.stderr
    time.sleep(0.2)
    assert server.connections == 0


def test_read_image_judges_an_oversized_file_by_its_size_without_reading_it(tmp_path, monkeypatch):
    big = tmp_path / "huge.png"
    with open(big, "wb") as file:
        file.write(boot.PNG_SIGNATURE)
        file.truncate(64 * 2**30)  # sparse: 64 GiB that nobody should try to read

    def no_open(*args, **kwargs):
        raise AssertionError("read_image opened a file it could refuse from its size")

    monkeypatch.setattr(boot, "open", no_open, raising=False)
    with pytest.raises(boot.ClientError, match="--init .* is over the 4194304-byte"):
        boot.read_image("--init", str(big))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_read_image_reads_at_most_one_byte_over_the_cap():
    # /dev/zero says it is 0 bytes and never ends: only a bounded read comes back.
    with pytest.raises(boot.ClientError, match="is over the"):
        boot.read_image("--mask", "/dev/zero")


# ---------------------------------------------------------------------------------------------
# Interactive mode
# ---------------------------------------------------------------------------------------------

def test_interactive_saves_an_image_and_exits(serve, tmp_path):
    server = serve()
    result = run_boot(port=server.port, out=tmp_path / "out", stdin="a cat\nexit\n")
    assert result.returncode == 0, result.stderr
    key = GenerationRequest("a cat").with_defaults("tiny", 64, 64, 2, 7.5, "default").cache_key()
    assert result.stdout == f"{tmp_path / 'out' / f'a-cat-{key[:12]}.png'}\n"
    assert Path(result.stdout.strip()).read_bytes() == PNG


def test_interactive_reuses_one_connection_and_keeps_going_after_errors(serve, tmp_path):
    def busy_first(conn, request, token, n):
        if n == 1:
            return conn.sendall(protocol.encode_error(protocol.E_BUSY, "too many pending"))
        answer(conn, request, token, n)

    server = serve(busy_first)
    stdin = f"a cat\n\na dog\n--\n  an owl  \n{'x' * 1001}\nQUIT\nnever sent\n"
    result = run_boot(port=server.port, out=tmp_path / "out", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert [Path(line).name.rsplit("-", 1)[0] for line in result.stdout.splitlines()] == ["a-dog", "image", "an-owl"]
    assert "busy: too many pending" in result.stderr and "prompt: has 1001 characters" in result.stderr
    assert [r.prompt for r, _ in server.requests] == ["a cat", "a dog", "--", "an owl"]
    assert server.connections == 1


def test_interactive_ends_at_end_of_input(serve, tmp_path):
    server = serve()
    result = run_boot(port=server.port, out=tmp_path / "out", stdin="a cat\n")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1


def test_interactive_reconnects_after_the_server_closed_an_idle_connection(serve, tmp_path):
    def answer_then_close(conn, request, token, n):
        answer(conn, request, token, n)
        return False  # as the gateway does after its idle timeout

    server = serve(answer_then_close)
    out = tmp_path / "out"
    client = subprocess.Popen([sys.executable, str(BOOT), "--port", str(server.port), "--out", str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={}, cwd=str(tmp_path))
    try:
        client.stdin.write("a cat\n")
        client.stdin.flush()
        deadline = time.monotonic() + 10
        while not list(out.glob("*.png")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the user types the next prompt a moment later
        stdout, stderr = client.communicate("a dog\n", timeout=30)
    finally:
        client.kill()
    assert client.returncode == 0, stderr
    assert len(stdout.splitlines()) == 2 and server.connections == 2 and len(server.requests) == 2
    assert "connection lost" not in stderr  # noticed before sending: nothing had to be retried


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------

def test_runs_as_a_module_too(tmp_path):
    result = subprocess.run([sys.executable, "-m", "client.boot", "--help"], cwd=REPO, capture_output=True,
                            text=True, env={})
    assert result.returncode == 0 and "--connect-timeout" in result.stdout


def test_sources_parse_as_python_3_9():
    for path in (BOOT, REPO / "client" / "protocol.py", REPO / "client" / "__init__.py"):
        ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=(3, 9))


def _python39() -> Optional[str]:
    installed = sorted(Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")).glob("versions/3.9*/bin/python3.9"))
    if installed:
        return str(installed[-1])
    found = shutil.which("python3.9")
    if not found:
        return None
    try:  # resolve a pyenv shim to the interpreter itself, which runs with an empty environment
        real = subprocess.run([found, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return real.stdout.strip() if real.returncode == 0 and real.stdout.strip() else None


def test_one_shot_under_python_3_9(serve, tmp_path):
    python = _python39()
    if python is None:
        pytest.skip("no python3.9 on PATH")
    server = serve()
    result = run_boot("a red fox", port=server.port, out=tmp_path / "out", python=python)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == PNG


# ---------------------------------------------------------------------------------------------
# Pieces, in process
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, slug", [
    ("A Red Fox, in the snow!", "a-red-fox-in-the-snow"),
    ("Café crème", "cafe-creme"),
    ("一只狐狸", "image"),
    ("   ", "image"),
    ("word " * 20, "word-word-word-word-word-word-word-word"),
])
def test_slug(prompt, slug):
    assert boot.slugify(prompt) == slug and len(slug) <= boot.SLUG_CHARS


def test_file_name_cannot_be_steered_by_the_server(tmp_path):
    reply = ImageReply({"key": "../../../../etc/passwd"}, PNG)
    path = Path(boot.save_image(reply, "a fox", str(tmp_path)))
    assert path.parent == tmp_path and path.name.startswith("a-fox-") and path.read_bytes() == PNG


def test_save_replaces_an_existing_file_atomically(tmp_path):
    reply = ImageReply({"key": "0123456789abcdef" * 4}, PNG)
    path = Path(boot.save_image(ImageReply(reply.meta, b"old"), "a fox", str(tmp_path)))
    assert boot.save_image(reply, "a fox", str(tmp_path)) == str(path)
    assert path.name == "a-fox-0123456789ab.png" and path.read_bytes() == PNG
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_boot_client_in_process_reuses_its_connection(serve, capsys):
    server = serve()
    client = boot.BootClient(port=server.port, timeout=10)
    try:
        first = client.generate(GenerationRequest("one"))
        second = client.generate(GenerationRequest("two"))
    finally:
        client.close()
    assert first.png == second.png == PNG and [s["state"] for s in first.statuses] == ["queued", "generating"]
    assert server.connections == 1 and "queued" in capsys.readouterr().err


def test_main_returns_non_zero_when_the_server_is_down(tmp_path, capsys):
    port = free_port()
    assert boot.main(["a fox", "--port", str(port), "--out", str(tmp_path), "--connect-timeout", "2"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_progress_on_a_tty_redraws_one_line():
    class Tty:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, text):
            self.text += text

        def flush(self):
            pass

    stream = Tty()
    progress = boot.Progress(stream)
    for status in ({"state": "queued"}, {"state": "waiting"}, {"state": "gen\x1b[2Jerating"}, ["not", "a dict"]):
        progress(status)
    progress.finish(ok=True)
    assert stream.text.count("\n") == 1 and stream.text.count("\r") >= 4 and "\x1b" not in stream.text
    assert "queued > gen[2Jerating" in stream.text


def test_server_text_cannot_drive_the_terminal(serve, tmp_path):
    """Item 9: escape codes and control characters in an error from the server are not printed."""
    evil = "bad \x1b[2J\x1b]0;owned\x07\x1b[31mred\x1b[0m\r\x08\x9b1m end"
    server = serve(lambda conn, request, token, n: conn.sendall(protocol.encode_error(protocol.E_BUSY, evil)))
    result = run_boot("a red fox", port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_FAILED
    assert "bad" in result.stderr and "red" in result.stderr and "end" in result.stderr
    assert not any(c in result.stderr for c in "\x1b\x9b\x07\x08\r"), repr(result.stderr)
    assert "owned" not in result.stderr


def test_tls_with_cacert_and_refusal_of_an_unknown_certificate(serve, tmp_path):
    import ssl

    from tests.tls import make_certificate

    cert, key = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = serve(tls=context)
    result = run_boot("a red fox", "--tls", "--cacert", str(cert), port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_OK, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == PNG
    # Without the CA the self-signed certificate is refused, and the message says what to do.
    result = run_boot("a red fox", "--tls", port=server.port, out=tmp_path / "out")
    assert result.returncode == boot.EXIT_FAILED and "--cacert" in result.stderr


def test_loras_travel_in_the_request_with_their_weights(serve, tmp_path):
    server = serve()
    result = run_boot("a red door", "--lora", "ink:0.8", "--lora", "grain", port=server.port, out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert server.requests == [(GenerationRequest("a red door", loras=(("ink", 0.8), ("grain", 1.0))), None)]


@pytest.mark.parametrize("value, words", [("ink:strong", "the weight after ':' must be a number"),
                                          (":0.5", "name the LoRA")])
def test_a_bad_lora_flag_is_a_usage_error(serve, tmp_path, value, words):
    server = serve()
    result = run_boot("a red door", "--lora", value, port=server.port, out=tmp_path / "out")
    assert result.returncode == 2 and words in result.stderr and server.connections == 0
