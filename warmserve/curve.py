"""ZeroMQ CURVE on the tcp:// sockets of a cluster pool, as both ends set it up.

The server makes two key pairs per instance (`CurveKeys`): its own, and the workers' one. The
server's sockets are CURVE servers with its own pair (controller/launchers/curve.py); a worker's
peer inbox, where the leads of its tensor-parallel models send it their steps, is a CURVE server
with the workers' pair. Either end lets in the workers' public key alone (`OneKey`, a ZAP
handler), so nothing on the network without the keys can send a worker commands or steps, nor
the server events; a client in turn checks the server key it expects.
"""

from __future__ import annotations

import logging

import zmq

log = logging.getLogger("warmserve.curve")
ZAP_DOMAIN = "warmserve"


class OneKey:
    """The ZAP handler's credentials check: one public key and no other."""

    def __init__(self, allowed: bytes):
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        """`key`: the peer's public key, Z85-encoded."""
        if key == self.allowed:
            return True
        log.warning("refused a connection with an unknown CURVE key")
        return False


def as_server(sock: zmq.Socket, secret_key: bytes) -> None:
    """Before bind: `sock` takes CURVE clients, checked by the context's ZAP handler."""
    sock.curve_server = True
    sock.curve_secretkey = secret_key
    sock.zap_domain = ZAP_DOMAIN.encode()


def as_client(sock: zmq.Socket, server_public: bytes, public: bytes, secret: bytes) -> None:
    """Before connect: `sock` presents the key pair (public, secret) to a server that must hold
    the secret of `server_public`."""
    sock.curve_serverkey = server_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret
