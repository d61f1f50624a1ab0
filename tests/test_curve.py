"""The tcp:// sockets of a cluster pool: only a peer with the workers' CURVE key pair is heard
(events, tensor-parallel steps) or dealt commands; anyone else on the network fails the
handshake. Real ZeroMQ sockets, no workers."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from warmserve.controller.launchers.curve import CurveServer
from warmserve.curve import as_client
from warmserve.protocol import CurveKeys, JoinGroup, LeaveGroup, peer_encoder
from warmserve.worker.peers import PeerLinks

HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def peer(context: zmq.asyncio.Context, kind: int, server: CurveServer, keys: str):
    """A socket with the workers' keys ("worker"), a key pair of its own ("forged"), or no
    CURVE at all ("plain")."""
    sock = context.socket(kind)
    sock.linger = 0
    if keys != "plain":
        sock.curve_serverkey = server.keys.server_public
        if keys == "worker":
            sock.curve_publickey, sock.curve_secretkey = (
                server.keys.client_public,
                server.keys.client_secret,
            )
        else:
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    return sock


async def next_handshake(monitor) -> int:
    return parse_monitor_message(await monitor.recv_multipart())["event"]


def test_only_the_workers_key_is_heard_and_dealt_commands():
    async def scenario() -> None:
        context = zmq.asyncio.Context()
        server = CurveServer(context, "127.0.0.1")
        events, commands = context.socket(zmq.PULL), context.socket(zmq.PUSH)
        events_address, commands_address = server.bind(events), server.bind(commands)
        events_monitor = events.get_monitor_socket(HANDSHAKE_EVENTS)
        commands_monitor = commands.get_monitor_socket(HANDSHAKE_EVENTS)
        peers = []
        try:
            # Nobody without the key can send the server events...
            for keys, refusal in (
                ("plain", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL),
                ("forged", zmq.EVENT_HANDSHAKE_FAILED_AUTH),
            ):
                intruder = peer(context, zmq.PUSH, server, keys)
                peers.append(intruder)
                intruder.connect(events_address)
                await intruder.send(f"from {keys}".encode())
                assert await next_handshake(events_monitor) == refusal
            worker = peer(context, zmq.PUSH, server, "worker")
            peers.append(worker)
            worker.connect(events_address)
            await worker.send(b"from worker")
            assert await next_handshake(events_monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED
            assert await events.recv() == b"from worker"

            # ...nor take a share of a worker's commands (PUSH deals them to every peer in turn).
            intruder = peer(context, zmq.PULL, server, "forged")
            peers.append(intruder)
            intruder.connect(commands_address)
            assert await next_handshake(commands_monitor) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
            receiver = peer(context, zmq.PULL, server, "worker")
            peers.append(receiver)
            receiver.connect(commands_address)
            assert await next_handshake(commands_monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED
            for index in range(4):
                await commands.send(b"command %d" % index)
            received = [await receiver.recv() for _ in range(4)]
            assert received == [b"command %d" % index for index in range(4)]
        finally:
            events.disable_monitor()
            commands.disable_monitor()
            for sock in (*peers, events, commands, events_monitor, commands_monitor):
                sock.close(linger=0)
            server.close()
            context.term()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_workers_peer_inbox_takes_steps_from_the_workers_alone():
    """The inbox where a tensor-parallel rank takes its lead's steps, bound on a tcp:// port of
    its node: another worker's links get through, nothing else on the network does."""
    # Two workers: a context each, as two processes have (one ZAP handler per context).
    context, lead_context = zmq.Context(), zmq.Context()
    server_public, _ = zmq.curve_keypair()
    keys = CurveKeys(server_public, *zmq.curve_keypair())
    follower = PeerLinks(context, "tcp://127.0.0.1:*", keys)
    lead = PeerLinks(lead_context, "tcp://127.0.0.1:*", keys)
    monitor = follower.inbox.get_monitor_socket(HANDSHAKE_EVENTS)
    intruders = []
    try:
        assert follower.address.startswith("tcp://127.0.0.1:")
        for kind, refusal in (
            ("plain", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL),
            ("forged", zmq.EVENT_HANDSHAKE_FAILED_AUTH),
        ):
            intruder = context.socket(zmq.PUSH)
            intruder.linger = 0
            if kind == "forged":
                as_client(intruder, keys.client_public, *zmq.curve_keypair())
            intruder.connect(follower.address)
            intruder.send(peer_encoder.encode(LeaveGroup("injected")))
            intruders.append(intruder)
            assert monitor.poll(10_000)
            assert parse_monitor_message(monitor.recv_multipart())["event"] == refusal
        lead.send([follower.address], JoinGroup("wide"))
        assert follower.inbox.poll(10_000)
        assert follower.receive() == JoinGroup("wide")
        assert not follower.inbox.poll(200)  # nothing the intruders sent
    finally:
        follower.inbox.disable_monitor()
        for sock in (*intruders, monitor):
            sock.close(linger=0)
        lead.close()
        follower.close()
        lead_context.term()
        context.term()
