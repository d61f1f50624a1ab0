"""The server's sockets reachable from the network: CURVE servers that let in the workers' key
alone, so a peer without it can neither send the server events nor take a worker's commands (a
PUSH socket would otherwise deal commands to any peer that connects). `warmserve/curve.py` says
how both ends use the keys; they travel to the workers in their start-up arguments.
"""

from __future__ import annotations

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from warmserve.curve import ZAP_DOMAIN, OneKey, as_server
from warmserve.protocol import CurveKeys


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
        self.authenticator.configure_curve_callback(ZAP_DOMAIN, OneKey(client_public))

    def bind(self, sock: zmq.Socket) -> str:
        """Binds `sock` to a free port on `host` as a CURVE server; returns its address."""
        as_server(sock, self._server_secret)
        port = sock.bind_to_random_port(f"tcp://{self.host}")
        return f"tcp://{self.host}:{port}"

    def close(self) -> None:
        self.authenticator.stop()
