"""Security default: a Redis password works end to end (the stack's server, every client of ours)."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import redis

from bridge.service import check_bridge
from bridge.service import redis_client as bridge_redis_client
from stack.private import private_data_dir, private_stack_settings
from stack.processes import free_port
from stack.redis_server import RedisServer
from vtuber_letta.redis_api import redis_client

pytestmark = pytest.mark.integration

PASSWORD = "redis-secret-for-test-7d1c"


@pytest.fixture
def secured_redis():
    data_dir = private_data_dir()
    port = free_port()
    server = RedisServer(data_dir, "127.0.0.1", port, PASSWORD)
    server.start(log=lambda _msg: None)
    try:
        yield private_stack_settings(data_dir, redis_port=port, redis_password=PASSWORD), server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_the_stacks_redis_requires_the_password_and_our_clients_send_it(secured_redis):
    settings, server = secured_redis
    anonymous = redis.Redis(host="127.0.0.1", port=settings.redis_port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    assert server.healthy()  # the stack's own health probe authenticates
    assert redis_client(settings).ping()  # provisioning / CLI client

    async def bridge_side():
        client = bridge_redis_client(settings)
        try:
            await client.set("vtl:bridge:test-replica", b"1", ex=5)  # a heartbeat, as a replica writes it
            return await check_bridge(settings, "test-replica")
        finally:
            await client.aclose()

    assert asyncio.run(bridge_side()) is True


def test_the_password_is_not_on_the_redis_command_line(secured_redis):
    _settings, server = secured_redis
    cmdline = open(f"/proc/{server.process.pid()}/cmdline", "rb").read()
    assert PASSWORD.encode() not in cmdline
