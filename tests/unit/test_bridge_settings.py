"""The bridge section of Settings: defaults, environment names, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_gateway import FakeGateway
from pydantic import ValidationError

from bridge.gateway import LettaGateway
from bridge.letta_turns import LettaTurns
from vtuber_letta.settings import Settings, SettingsError, load_settings


def test_defaults(monkeypatch):
    for name in ("LETTA_ENABLED", "LETTA_FALLBACK_TO_MEMORY", "VTL_BRIDGE_UPLOADS_DIR", "VTL_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    s = Settings(_env_file=None)
    assert (s.letta_enabled, s.letta_fallback_to_memory, s.bridge_tts_handoff) == (True, True, True)
    assert s.letta_memory_type_routing == {"permanent": "letta", "temporary": "memory-python"}
    assert s.bridge_default_memory_type == "permanent"
    assert (s.bridge_request_queue, s.bridge_response_channel, s.bridge_memory_queue, s.bridge_tts_queue,
            s.bridge_avatar_channel) == ("letta_requests", "letta_responses", "user_input_queue", "tts_requests", "live2d_events")
    assert s.bridge_uploads_path == Path("data") / "uploads"
    assert s.bridge_lock_ttl > s.letta_timeout  # a dead worker's turn has ended before anyone looks for it


def test_environment_names(monkeypatch, tmp_path):
    monkeypatch.setenv("LETTA_ENABLED", "false")
    monkeypatch.setenv("LETTA_FALLBACK_TO_MEMORY", "0")
    monkeypatch.setenv("LETTA_MEMORY_TYPE_ROUTING", '{"temporary": "letta"}')
    monkeypatch.setenv("VTL_BRIDGE_EVENT_TURNS", '["gift", "super_chat"]')
    monkeypatch.setenv("VTL_BRIDGE_UPLOADS_DIR", str(tmp_path))
    monkeypatch.setenv("VTL_BRIDGE_METRICS_PORT", "0")
    monkeypatch.setenv("VTL_BRIDGE_REPLICA_ID", "bridge-1")
    s = Settings(_env_file=None)
    assert (s.letta_enabled, s.letta_fallback_to_memory) == (False, False)
    assert s.letta_memory_type_routing == {"temporary": "letta"}
    assert s.bridge_event_turns == {"gift", "super_chat"}
    assert s.bridge_uploads_path == tmp_path and s.bridge_metrics_port == 0 and s.bridge_replica_id == "bridge-1"


@pytest.mark.parametrize(
    "values",
    [
        {"VTL_BRIDGE_HEARTBEAT_INTERVAL": 5, "VTL_BRIDGE_HEARTBEAT_TTL": 2},
        {"VTL_BRIDGE_RETRY_BASE_DELAY": 10, "VTL_BRIDGE_RETRY_MAX_DELAY": 1},
        {"VTL_BRIDGE_REPLICA_ID": "a b"},
        {"VTL_BRIDGE_CONCURRENCY": 0},
        {"VTL_BRIDGE_EVENT_TURNS": ["chat"]},
        {"LETTA_MEMORY_TYPE_ROUTING": {"permanent": "somewhere"}},
        {"VTL_BRIDGE_REQUEST_QUEUE": ""},
    ],
)
def test_invalid_values_are_refused(values):
    with pytest.raises(ValidationError):
        Settings(_env_file=None, **values)


def test_gateways_follow_the_protocol():
    assert isinstance(FakeGateway(), LettaGateway)
    assert callable(LettaTurns.send_turn) and callable(LettaTurns.find_answered)


# --------------------------------------------------------------------------- capacity follows Letta's workers

def test_concurrency_follows_the_letta_workers_it_points_at():
    one = Settings(_env_file=None)
    assert one.letta_workers == 1
    assert one.bridge_concurrency == one.bridge_concurrency_per_letta_worker == 32
    assert Settings(_env_file=None, VTL_LETTA_WORKERS=2).bridge_concurrency == 64
    assert Settings(_env_file=None, VTL_LETTA_WORKERS=2).bridge_concurrency == 64
    assert Settings(_env_file=None, VTL_LETTA_WORKERS=3, VTL_BRIDGE_CONCURRENCY_PER_LETTA_WORKER=8).bridge_concurrency == 24
    # At most what one replica may run (16 workers x 32 would be 512).
    assert Settings(_env_file=None, VTL_LETTA_WORKERS=16).bridge_concurrency == 256


def test_an_explicit_concurrency_wins_over_the_workers(monkeypatch):
    monkeypatch.setenv("VTL_BRIDGE_CONCURRENCY", "5")
    monkeypatch.setenv("VTL_LETTA_WORKERS", "4")
    s = Settings(_env_file=None)
    assert (s.letta_workers, s.bridge_concurrency) == (4, 5)


@pytest.mark.parametrize("values", [{"VTL_LETTA_WORKERS": 0}, {"VTL_LETTA_WORKERS": 17},
                                    {"VTL_BRIDGE_CONCURRENCY_PER_LETTA_WORKER": 0}])
def test_a_bad_worker_count_is_refused_by_name(values):
    [(name, value)] = values.items()
    with pytest.raises(SettingsError, match=name):
        load_settings(_env_file=None, **values)
