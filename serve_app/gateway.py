"""The gateway: a Ray Serve deployment that is the caching front server (asyncio, no thread per waiter).

Each replica answers the boot client's framed TCP protocol on a port shared by the replicas of
its node (SO_REUSEPORT) and HTTP through Serve's proxy; both call one FrontService, so both
return the same bytes for the same parameters.
"""


import asyncio
import base64
import logging
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from celery_bridge.config import load_celery_config
from celery_bridge.producer import GenerationProducer
from celery_bridge.redis_check import require_redis_version
from serve_app import stats, webui
from serve_app.admission import Admission
from serve_app.autoscaling import SOCKET_LOAD_METRIC
from serve_app.config import load_gateway_config
from serve_app.front import FrontService
from serve_app.images_api import client_of, credential, images_options, public_meta, read_edit, read_generation
from serve_app.openai_errors import error_response, http_error
from serve_app.signed_urls import SignedUrls
from serve_app import a1111_api, jobs_api
from serve_app.http_front import HttpFrontServer
from serve_app.jobs import JobService
from serve_app.metrics import RayMetrics
from serve_app.placement import ingress_actor_options
from serve_app.socket_server import SocketFrontServer
from serve_app.store import open_store
from serve_app.tenants import ANONYMOUS, Tenant, TenantRegistry

log = logging.getLogger(__name__)
QUEUE_DEPTH_PERIOD_S = 2.0
# No docs routes: both ports serve exactly ROUTES.
api = FastAPI(title="sdgate", description="Text to image: OpenAI-style Images API over sdgate's cache and workers",
              docs_url=None, redoc_url=None, openapi_url=None)


# Every HTTP route, once: (path, the Gateway method that answers it, methods). Serve's proxy port
# (FastAPI, 8000) and each replica's fast port (serve_app/http_front.py, 8001) are both built from it.
ROUTES: List[Tuple[str, str, List[str]]] = [
    ("/", "page", ["GET"]),
    ("/static/{name}", "static", ["GET"]),
    ("/healthz", "healthz", ["GET"]),
    ("/v1/images/generations", "generations", ["POST"]),
    ("/v1/images/edits", "edits", ["POST"]),
    ("/v1/images/{name}", "image", ["GET"]),
    ("/v1/gallery", "gallery", ["GET"]),
    ("/v1/models", "models", ["GET"]),
    ("/v1/stats", "stats", ["GET"]),
    ("/v1/jobs", "create_job", ["POST"]),
    ("/v1/jobs/{job_id}", "get_job", ["GET"]),
    ("/v1/jobs/{job_id}", "delete_job", ["DELETE"]),
    ("/v1/jobs/{job_id}/events", "job_events", ["GET"]),
    ("/v1/jobs/{job_id}/image", "job_image", ["GET"]),
    *((path, name, methods) for path, name, methods in a1111_api.ROUTES),
]


class Gateway:
    """One gateway replica: socket front server + HTTP routes over a shared FrontService."""

    def __init__(self, gateway: Optional[Dict[str, Any]] = None, celery: Optional[Dict[str, Any]] = None):
        self.config = load_gateway_config(**(gateway or {}))
        celery_config = load_celery_config(**(celery or {}))
        require_redis_version(celery_config.redis_client(socket_timeout=5, socket_connect_timeout=5), "the gateway")
        producer = GenerationProducer(celery_config)
        store = open_store(self.config.cache_backend, path=self.config.resolved_cache_path(),
                           redis_url=producer.config.broker_url(), max_bytes=self.config.cache_max_bytes)
        counters = stats.Counters(producer.redis, self.config.stats_flush_s)
        self.metrics = RayMetrics()
        counters.listeners.append(self.metrics.on_count)
        self.tenants = TenantRegistry(producer.redis)
        self.admission = Admission(self.config, self.tenants)
        self.front = FrontService(self.config, producer, store, counters, on_generated=self._observe_generation,
                                  admission=self.admission)
        self.socket_server = SocketFrontServer(self.front, self.config).start()
        self._stopped = threading.Event()
        threading.Thread(target=self._watch_queue, name="sdgate-queue-depth", daemon=True).start()
        self.jobs = JobService(self.front)
        self.urls = SignedUrls(producer.redis, self.config.image_url_ttl_s)
        self.a1111 = a1111_api.A1111Api(self)
        self.http_front = HttpFrontServer(self.config, [(path, getattr(self, name), methods)
                                                        for path, name, methods in ROUTES]).start()
        log.info("gateway replica serving sockets on %s:%s", self.config.host, self.socket_server.port)

    async def generations(self, request: Request) -> JSONResponse:
        """OpenAI Images API: returns data[0].b64_json, plus sdgate's metadata."""
        client = client_of(self.admission, request)
        try:
            generation, extras, tenant = await read_generation(self.admission, request, client,
                                                               ("stream", "partial_images", "n", "response_format"))
        except ProtocolError as exc:
            self.front.counters.error(exc.code)
            return http_error(exc)
        streaming, partial_images = extras.get("stream", False), extras.get("partial_images", 0)
        if streaming:  # OpenAI's image streaming (serve_app/jobs_api.py)
            if extras.get("n", 1) != 1:
                return http_error(ProtocolError(protocol.E_INVALID_REQUEST, "a stream is one image; send n=1 "
                                                "with stream", field="n"))
            return await jobs_api.stream_generation(self, generation, partial_images, client, tenant)
        return await self._images(request, generation, extras, client, tenant)

    async def edits(self, request: Request) -> JSONResponse:
        """OpenAI's image edits (multipart: image, optional mask, prompt, n, size, response_format):
        img2img, or inpainting with a mask; answered as generations are."""
        client = client_of(self.admission, request)
        try:
            generation, n, response_format, tenant = await read_edit(self.admission, request, client)
        except ProtocolError as exc:
            self.front.counters.error(exc.code)
            return http_error(exc)
        return await self._images(request, generation, {"n": n, "response_format": response_format}, client, tenant)

    async def _images(self, request: Request, generation: GenerationRequest, extras: Dict[str, Any], client: str,
                      tenant: Tenant) -> JSONResponse:
        """The Images API answer: n images, each as b64_json or a signed URL, plus sdgate's metadata."""
        try:
            n, response_format = images_options(extras)
            answers = await self.front.generate_seeds(generation, n, client=client, tenant=tenant)
            if response_format == "url":
                base = str(request.base_url)
                urls = await asyncio.to_thread(lambda: [self.urls.url(base, a.meta["key"]) for a in answers])
        except ProtocolError as exc:
            return http_error(exc)
        revised = protocol.normalize_prompt(generation.prompt)
        data = [{"url": urls[i]} if response_format == "url" else
                {"b64_json": base64.b64encode(answer.png).decode("ascii")} for i, answer in enumerate(answers)]
        metas = [dict(public_meta(answer.meta), cached=answer.cached) for answer in answers]
        return JSONResponse({
            "created": int(time.time()),
            "data": [dict(item, revised_prompt=revised) for item in data],
            "sdgate": dict(metas[0], images=metas) if n > 1 else metas[0],
        })

    # Jobs (serve_app/jobs_api.py): a generation that outlives its request, readable from any replica.
    async def create_job(self, request: Request) -> Response:
        return await jobs_api.create_job(self, request)

    async def get_job(self, request: Request) -> Response:
        return await jobs_api.get_job(self, request)

    async def delete_job(self, request: Request) -> Response:
        return await jobs_api.delete_job(self, request)

    async def job_events(self, request: Request) -> Response:
        return await jobs_api.job_events(self, request)

    async def job_image(self, request: Request) -> Response:
        return await jobs_api.job_image(self, request)

    def models(self, request: Request) -> JSONResponse:
        """OpenAI's model list, each model with its defaults, limits and live worker count."""
        refused = self._refused(request)
        return refused or JSONResponse(self.front.catalogue.listing())

    async def page(self, request: Request) -> Response:
        """The web page (serve_app/web/index.html); it asks for the token itself when one is needed."""
        return webui.asset("index.html")

    async def static(self, request: Request) -> Response:
        return webui.asset(request.path_params["name"])

    async def image(self, request: Request) -> Response:
        """A cached PNG by key (`<key>.png`), with a strong ETag and a year of Cache-Control; with a
        signed URL's `expires` and `signature` (response_format "url"), without the key until it expires."""
        name, query = request.path_params["name"], request.query_params
        if "signature" in query or "expires" in query:
            key = webui.image_key(name)
            valid = key is not None and await asyncio.to_thread(self.urls.valid, key, query.get("expires", ""),
                                                                 query.get("signature", ""))
            if not valid:
                return error_response(protocol.E_UNAUTHORIZED, "this image URL has expired or is not one sdgate "
                                      "signed; ask for the image again (response_format url gives a fresh URL)",
                                      status=403)
        else:
            refused = self._refused(request)
            if refused:
                return refused
        return await asyncio.to_thread(webui.image_response, self.front.store, name, request.headers.get("if-none-match"))

    async def gallery(self, request: Request) -> Response:
        """Cache entries with their parameters, newest first: `?limit=N&before=CURSOR`; a tenant's
        key lists only the images that tenant asked for."""
        tenant, refused = self.authenticate(request)
        if refused:
            return refused
        own = None if tenant.shared else tenant.name  # the shared identities see every cached image
        return await asyncio.to_thread(webui.gallery, self.front.store, dict(request.query_params),
                                       self.front.redis, own)

    def healthz(self, request: Request) -> Dict[str, Any]:
        return {"ok": self.socket_server.alive(), "socket_port": self.socket_server.port,
                "fast_http_port": self.http_front.port,
                "pending_misses": self.front.pending_misses, "open_connections": self.socket_server.open_connections,
                "waiting": self.admission.waiting}

    def stats(self, request: Request) -> Any:
        refused = self._refused(request)
        return refused or stats.read_stats(self.front.producer.redis)

    def _refused(self, request: Request) -> Optional[JSONResponse]:
        """The error answer for a request without a valid key, else None."""
        return self.authenticate(request)[1]

    def authenticate(self, request: Request) -> Tuple[Tenant, Optional[JSONResponse]]:
        """(the tenant its key names, None), or (anonymous, the error answer)."""
        try:
            return self.admission.authenticate(credential(request)), None
        except ProtocolError as exc:
            self.front.counters.error(exc.code)
            return ANONYMOUS, http_error(exc)

    def record_autoscaling_stats(self) -> Dict[str, float]:
        """Socket and fast-HTTP load for serve_app.autoscaling.gateway_load_policy (Serve sees neither)."""
        return {SOCKET_LOAD_METRIC: self.socket_server.average_load() + self.http_front.average_load()}

    def _observe_generation(self, pipeline_ms: float, miss_ms: float) -> None:
        self.metrics.generation_ms.observe(pipeline_ms)
        self.metrics.miss_ms.observe(miss_ms)

    def _watch_queue(self) -> None:
        while not self._stopped.wait(QUEUE_DEPTH_PERIOD_S):
            try:
                self.metrics.set_tenant_usage(self.tenants.usage())
            except Exception:  # noqa: BLE001 - as below
                pass
            for model in self.front.catalogue.catalogue.names:
                try:
                    self.metrics.set_model_gauges(model, self.front.producer.queue_length(model),
                                                  self.front.catalogue.live_count(model))
                except Exception:  # noqa: BLE001 - a missing gauge point is not worth a log line per second
                    pass

    def check_health(self) -> None:
        if not self.socket_server.alive():
            raise RuntimeError("the socket front server thread of this replica has stopped")
        if not self.http_front.alive():
            raise RuntimeError("the fast HTTP listener thread of this replica has stopped")

    def __del__(self) -> None:
        server = getattr(self, "socket_server", None)
        if server is not None:
            self._stopped.set()
            server.stop()
            if getattr(self, "http_front", None) is not None:
                self.http_front.stop()
            self.jobs.close()
            self.front.close()
            self.front.counters.close()


for _path, _name, _methods, _target in a1111_api.ROUTES_TO:
    setattr(Gateway, _name, a1111_api.gateway_method(_name, _target))
for _path, _name, _methods in ROUTES:
    api.add_api_route(_path, getattr(Gateway, _name), methods=_methods)
Gateway = serve.deployment(name="Gateway", max_ongoing_requests=256, health_check_period_s=5,
                           ray_actor_options={"num_cpus": 0.25})(serve.ingress(api)(Gateway))


def build_app(args: Optional[Dict[str, Any]] = None) -> serve.Application:
    """Serve application builder (`import_path: serve_app.gateway:build_app`).

    args: {"gateway": {GatewayConfig overrides}, "celery": {CeleryConfig overrides},
    "autoscaling_config": optional, "on_ingress_node": place replicas on the ingress node (the
    head; serve_app.placement)}; a Serve config file may override the deployment options.
    """
    args = args or {}
    deployment = Gateway.options(autoscaling_config=args["autoscaling_config"]) if args.get(
        "autoscaling_config") else Gateway
    if args.get("on_ingress_node"):  # only on nodes that advertise serve_app.placement's resource
        deployment = deployment.options(ray_actor_options=ingress_actor_options(Gateway.ray_actor_options))
    return deployment.bind(args.get("gateway"), args.get("celery"))
