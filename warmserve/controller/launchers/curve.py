"""Server sockets reachable from the network, secured with ZeroMQ CURVE.

The server makes two key pairs per instance: its own, and the one its workers present. Every
server socket is a CURVE server, and a ZAP handler lets in only the workers' public key, so a
peer without the key can neither send the server events nor take a worker's commands (a PUSH
socket would otherwise deal commands to any peer that connects); the worker in turn checks the
server's public key. The keys travel to the workers in their start-up arguments.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from warmserve.protocol import CurveKeys

log = logging.getLogger("warmserve.controller")
ZAP_DOMAIN = "warmserve"


class CurveServer:
    def __init__(self, context: zmq.asyncio.Context, host: str):
        if not zmq.has("curve"):
            raise RuntimeError(
                "this libzmq was built without CURVE; workers on other hosts need it "
                "(pip install a pyzmq wheel, which bundles a libzmq with CURVE)"
            )
        self.host = host
        self._server_public, self._server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        self.keys = CurveKeys(self._server_public, client_public, client_secret)
        self.authenticator = AsyncioAuthenticator(context)
        self.authenticator.start()
        self.authenticator.configure_curve_callback(ZAP_DOMAIN, _OneKey(client_public))

    def bind(self, sock: zmq.Socket) -> str:
        """Binds `sock` to a free port on `host` as a CURVE server; returns its address."""
        sock.curve_server = True
        sock.curve_secretkey = self._server_secret
        sock.zap_domain = ZAP_DOMAIN.encode()
        port = sock.bind_to_random_port(f"tcp://{self.host}")
        return f"tcp://{self.host}:{port}"

    def close(self) -> None:
        self.authenticator.stop()


class _OneKey:
    """The ZAP handler's credentials check: the workers' public key and no other."""

    def __init__(self, allowed: bytes):
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        """`key`: the peer's public key, Z85-encoded."""
        if key == self.allowed:
            return True
        log.warning("refused a connection with an unknown CURVE key")
        return False
