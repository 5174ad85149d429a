"""sdgate's client side: the wire protocol shared with the server, and the boot client.

Standard library only; importing this package loads no ray, celery, torch or diffusers.
"""

from client.protocol import (  # noqa: F401
    ConnectionClosed,
    GenerationRequest,
    ImageReply,
    InvalidRequest,
    ProtocolError,
    exchange,
    list_models,
)
