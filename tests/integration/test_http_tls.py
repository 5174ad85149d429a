"""HTTP with a certificate configured: a real stack serves HTTPS on the fast port and through
Serve's proxy, with the same bytes, and no plain HTTP on either port."""

from __future__ import annotations

import base64
import http.client
import json
import ssl

import pytest

from client.protocol import GenerationRequest
from tests.integration.harness import ask, local_stack
from tests.tls import make_certificate

pytestmark = pytest.mark.integration
PATH = "/v1/images/generations"


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory):
    certfile, keyfile = make_certificate(tmp_path_factory.mktemp("tls"))
    with local_stack("celery", workers=1, tls_certfile=str(certfile), tls_keyfile=str(keyfile)) as stack:
        yield stack, ssl.create_default_context(cafile=str(certfile))


def _images(conn: http.client.HTTPConnection, body: dict) -> dict:
    conn.request("POST", PATH, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    assert response.status == 200, payload[:300]
    return json.loads(payload)


def test_https_hit_on_both_ports_and_no_plain_http(tls_stack):
    stack, context = tls_stack
    png = ask(stack, GenerationRequest("served over tls", seed=9)).png  # renders; HTTP then hits
    assert stack.addresses()["http_fast"].startswith("https://")
    for port in (stack.gateway.fast_http_port, stack.gateway.http_port):
        secure = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=context)
        answer = _images(secure, {"prompt": "served over tls", "seed": 9, "size": "64x64"})
        assert base64.b64decode(answer["data"][0]["b64_json"]) == png
        assert answer["sdgate"]["cached"] is True
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("POST", PATH, body=json.dumps({"prompt": "served over tls", "seed": 9}))
            response = plain.getresponse()
            response.read()
            raise AssertionError(f"port {port} answered plain HTTP with {response.status}")
