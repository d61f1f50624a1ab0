"""The sockets between the ranks of tensor-parallel models: each worker takes the messages of
the leads it follows on one socket (its peer address), and a lead keeps one socket to each worker
it sends to. ZeroMQ keeps each sender's messages in order, and msgspec encodes them (no pickling).

Why sockets rather than a tensor broadcast over the model's group: a broadcast is a collective,
so a rank would have to sit in it waiting for the next step and could serve nothing else; the
worker's loop polls this inbox with its commands instead, so a rank between two steps of one
model serves its other models. And one ordered channel from the lead carries the group's
formation and release as well as its steps, which a collective over the group itself cannot.
"""

from __future__ import annotations

import zmq
from zmq.auth.thread import ThreadAuthenticator

from warmserve.curve import ZAP_DOMAIN, OneKey, as_client, as_server
from warmserve.protocol import CurveKeys, PeerMessage, peer_decoder, peer_encoder


class PeerLinks:
    """`address`: where to bind the inbox, as the launcher made it (a tcp:// one may leave the
    port to ZeroMQ: `tcp://host:*`); `self.address` is where it is bound, for the others.
    With `curve` (tcp://), the inbox lets in the workers' key alone and the outboxes present it
    (warmserve/curve.py): nothing else on the network can inject a step."""

    def __init__(self, context: zmq.Context, address: str, curve: CurveKeys | None = None):
        self.context = context
        self.curve = curve
        self.authenticator: ThreadAuthenticator | None = None
        self.inbox = context.socket(zmq.PULL)
        if curve is not None:
            self.authenticator = ThreadAuthenticator(context)
            self.authenticator.start()
            self.authenticator.configure_curve_callback(ZAP_DOMAIN, OneKey(curve.client_public))
            as_server(self.inbox, curve.client_secret)
        self.inbox.bind(address)
        self.address = self.inbox.last_endpoint.decode()
        self.outboxes: dict[str, zmq.Socket] = {}

    def send(self, addresses: list[str], message: PeerMessage) -> None:
        """Queues `message` for each address; never blocks (a dead rank's queue only grows
        until the model is dropped, which the failed collective reports)."""
        data = peer_encoder.encode(message)
        for address in addresses:
            outbox = self.outboxes.get(address)
            if outbox is None:
                outbox = self.outboxes[address] = self.context.socket(zmq.PUSH)
                outbox.setsockopt(zmq.LINGER, 0)
                if self.curve is not None:
                    keys = self.curve
                    as_client(outbox, keys.client_public, keys.client_public, keys.client_secret)
                outbox.connect(address)
            outbox.send(data, zmq.NOBLOCK)

    def receive(self) -> PeerMessage | None:
        """The next message waiting, or None."""
        if not self.inbox.poll(0):
            return None
        return peer_decoder.decode(self.inbox.recv())

    def forget(self, addresses: set[str]) -> None:
        """Closes the sockets to ranks that no model here sends to any more."""
        for address in addresses:
            outbox = self.outboxes.pop(address, None)
            if outbox is not None:
                outbox.close()

    def close(self) -> None:
        for outbox in self.outboxes.values():
            outbox.close()
        self.inbox.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()
