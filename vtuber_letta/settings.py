"""The one configuration object of vtuber-letta.

Environment first (then `.env`), validated once at start. Names follow the host's
integration plan where it has them (LETTA_API_URL, LETTA_API_KEY, LETTA_MODEL,
LETTA_TIMEOUT, LETTA_RETRY_ATTEMPTS, REDIS_HOST/REDIS_PORT or REDIS_URL).

The local stack reads the same object: Letta is started on the host/port of
LETTA_API_URL and Redis on the host/port of the Redis settings, so a client and
the stack it talks to can never disagree about an address.
"""

from __future__ import annotations

import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vtuber_letta.model_names import EMBEDDING_MODEL_ID, SCRIPTED_MODEL_ID
from vtuber_letta.private_files import create_private, private_dir

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
BRIDGE_CONCURRENCY_MAX = 256


class SettingsError(SystemExit):
    """Raised (exit code 2) when the environment holds an invalid value."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    # --- Letta server (names from the host's plan) ---
    letta_api_url: str = Field("http://127.0.0.1:8283", alias="LETTA_API_URL")
    letta_api_key: SecretStr | None = Field(None, alias="LETTA_API_KEY")
    letta_model: str | None = Field(None, alias="LETTA_MODEL")
    letta_embedding: str | None = Field(None, alias="LETTA_EMBEDDING")
    letta_timeout: float = Field(30.0, alias="LETTA_TIMEOUT", gt=0, le=3600)
    letta_retry_attempts: int = Field(3, alias="LETTA_RETRY_ATTEMPTS", ge=0, le=20)

    # --- Redis ---
    redis_url: str | None = Field(None, alias="REDIS_URL")
    redis_host: str = Field("127.0.0.1", alias="REDIS_HOST")
    redis_port: int = Field(6380, alias="REDIS_PORT", ge=1, le=65535)
    redis_password: SecretStr | None = Field(None, alias="REDIS_PASSWORD")

    # --- the upstream model the Letta server uses ---
    openai_api_key: SecretStr | None = Field(None, alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(None, alias="OPENAI_BASE_URL")
    ollama_base_url: str | None = Field(None, alias="OLLAMA_BASE_URL")

    # --- local stack (only `vtuber-letta stack ...` reads these) ---
    data_dir: Path = Field(Path("data"), alias="VTL_DATA_DIR")
    letta_server_home: Path = Field(Path(".letta-server"), alias="VTL_LETTA_SERVER_HOME")
    postgres_port: int = Field(5433, alias="VTL_POSTGRES_PORT", ge=1, le=65535)
    scripted_model_port: int = Field(8399, alias="VTL_SCRIPTED_MODEL_PORT", ge=1, le=65535)
    stack_user: str = Field("vtuber-letta", alias="VTL_STACK_USER")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", alias="VTL_LOG_LEVEL")
    # uvicorn workers of a Letta server (LETTA_UVICORN_WORKERS; stack/letta_workers.py boots and counts
    # them): each a process of its own (~0.5 GB RSS) that can keep one core busy. The one default of
    # the worker count: the stack and docker compose start this many, and the bridge sizes its
    # concurrency by it. 1: on a 2-core machine a second worker pays 1.42x the plain turns/s at 8
    # and at 32 viewers (bench/throughput.py --letta-workers 1,2, quiet machine, docs/BENCHMARKS.md
    # §10), but one viewer's turn took 1.19x as long and a memory write 2.5x (one sequential run,
    # same section), and it costs ~0.45 GB and ~24 s per boot more: 2 pays only for a chat busier
    # than one worker serves (OPERATIONS.md "More cores").
    letta_workers: int = Field(1, alias="VTL_LETTA_WORKERS", ge=1, le=16)

    # --- the memory gate (tools/memory_gate.py): the only writer of a viewer's human block on a
    # memory tool's behalf. Letta hands the URL to the tools; the secret signs each agent's token.
    memory_gate_url: str = Field("http://127.0.0.1:8285", alias="VTL_MEMORY_GATE_URL")
    memory_gate_listen: str | None = Field(None, alias="VTL_MEMORY_GATE_LISTEN", pattern=r"^[\w.\-]*:[0-9]{1,5}$")  # host:port; default: the URL's
    memory_gate_secret_value: SecretStr | None = Field(None, alias="VTL_MEMORY_GATE_SECRET")

    # --- the console (console/): the streamer's web page over her memory, on loopback by default.
    # 0.0.0.0 only inside a container (published on 127.0.0.1 by compose). The password: this one,
    # else one generated once (mode 0600) beside the Letta password (`vtuber-letta console` says where).
    console_host: str = Field("127.0.0.1", alias="VTL_CONSOLE_HOST", pattern=r"^[\w.\-:]+$")
    console_port: int = Field(8286, alias="VTL_CONSOLE_PORT", ge=1, le=65535)
    console_password_value: SecretStr | None = Field(None, alias="VTL_CONSOLE_PASSWORD", min_length=8)

    # --- the agent template and the persona it is rendered from (provisioning) ---
    template_name: str = Field("vtuber", alias="VTL_TEMPLATE", pattern=r"^[a-z][a-z0-9_-]{0,49}$")
    persona_config: Path = Field(Path("data/config/persona.yaml"), alias="VTL_PERSONA_CONFIG")

    # ======================= bridge (bridge/; owned by the bridge) =======================
    # Stream-end episodes (provisioning/episodes.py): one model call per viewer who spoke, run by
    # `vtuber-letta stream end` and `stream sweep`, never by the bridge. Off: both summarise nobody.
    episodes_enabled: bool = Field(True, alias="VTL_EPISODES")
    # `stream sweep`: a viewer whose last turn is this many hours old has ended their stream (one
    # episode of what they said since their last one).
    episode_after_silence_hours: float = Field(3.0, alias="VTL_EPISODE_AFTER_SILENCE_HOURS", gt=0, le=24 * 30)
    # Switches named after the host's plan (letta.enabled, letta.fallback_to_memory,
    # letta.memory_type_routing). A task without meta.memory_type counts as
    # VTL_BRIDGE_DEFAULT_MEMORY_TYPE (permanent: a viewer's words are remembered unless
    # the producer says otherwise).
    letta_enabled: bool = Field(True, alias="LETTA_ENABLED")
    letta_fallback_to_memory: bool = Field(True, alias="LETTA_FALLBACK_TO_MEMORY")
    letta_memory_type_routing: dict[Literal["permanent", "temporary"], Literal["letta", "memory-python"]] = Field(
        default_factory=lambda: {"permanent": "letta", "temporary": "memory-python"},
        alias="LETTA_MEMORY_TYPE_ROUTING",
    )
    bridge_default_memory_type: Literal["permanent", "temporary"] = Field(
        "permanent", alias="VTL_BRIDGE_DEFAULT_MEMORY_TYPE"
    )
    # Redis names the bridge reads/writes that a deployment may rename (defaults: the host's names).
    bridge_request_queue: str = Field("letta_requests", alias="VTL_BRIDGE_REQUEST_QUEUE", min_length=1)
    bridge_response_channel: str = Field("letta_responses", alias="VTL_BRIDGE_RESPONSE_CHANNEL", min_length=1)
    bridge_memory_queue: str = Field("user_input_queue", alias="VTL_BRIDGE_MEMORY_QUEUE", min_length=1)
    bridge_tts_queue: str = Field("tts_requests", alias="VTL_BRIDGE_TTS_QUEUE", min_length=1)
    bridge_avatar_channel: str = Field("live2d_events", alias="VTL_BRIDGE_AVATAR_CHANNEL", min_length=1)
    # true: replies go to the TTS queue and are spoken; false: text-only {"text": ...} on task_response.
    bridge_tts_handoff: bool = Field(True, alias="VTL_BRIDGE_TTS_HANDOFF")
    # Streaming: the reply is read from Letta token by token and published sentence by sentence
    # on the chunk channel while the agent is still talking; the final response is unchanged.
    bridge_streaming: bool = Field(True, alias="VTL_BRIDGE_STREAMING")
    bridge_chunk_channel: str = Field("letta_response_chunks", alias="VTL_BRIDGE_CHUNK_CHANNEL", min_length=1)
    # With TTS handoff and streaming: one TTS request per sentence, so speech starts with the first
    # sentence. Off by default because the stock host's output handler stops listening on
    # task_response:{task_id} after the first message, so it would play only the first sentence;
    # turn it on for a consumer that plays every message of a task (e.g. the host's streaming engine).
    bridge_tts_per_sentence: bool = Field(False, alias="VTL_BRIDGE_TTS_PER_SENTENCE")
    # Burst coalescing: up to this many chat messages waiting in one viewer's queue go to Letta as
    # one turn (one user message each). 1 = one turn per message.
    bridge_coalesce_max: int = Field(8, alias="VTL_BRIDGE_COALESCE_MAX", ge=1, le=50)
    # A viewer with messages already waiting is mid-burst: wait in steps of this long while the burst
    # keeps arriving (at most 1 s) before sending the group. A lone message is never delayed.
    bridge_coalesce_wait_ms: int = Field(150, alias="VTL_BRIDGE_COALESCE_WAIT_MS", ge=0, le=1000)
    # input_file is read only from inside this folder (default: <VTL_DATA_DIR>/uploads). The stock
    # host writes /tmp/aivtuber_tasks/<task>/input.txt: point this there to accept its files.
    bridge_uploads_dir: Path | None = Field(None, alias="VTL_BRIDGE_UPLOADS_DIR")
    bridge_max_input_file_bytes: int = Field(65536, alias="VTL_BRIDGE_MAX_INPUT_FILE_BYTES", ge=1, le=16 * 1024 * 1024)
    bridge_max_payload_bytes: int = Field(65536, alias="VTL_BRIDGE_MAX_PAYLOAD_BYTES", ge=1024, le=16 * 1024 * 1024)
    # Viewers served at once per replica (one turn in flight each). Letta queues what it cannot run
    # yet, so this only needs to exceed what Letta runs at once (bench/throughput.py: ~4 per worker
    # on 2 cores); more only queues in Letta and fills its DB pool. Unset, it follows the Letta
    # capacity it points at: VTL_BRIDGE_CONCURRENCY_PER_LETTA_WORKER x VTL_LETTA_WORKERS, so adding
    # workers needs no second setting.
    bridge_concurrency_per_letta_worker: int = Field(32, alias="VTL_BRIDGE_CONCURRENCY_PER_LETTA_WORKER", ge=1,
                                                     le=BRIDGE_CONCURRENCY_MAX)
    bridge_concurrency: int | None = Field(None, alias="VTL_BRIDGE_CONCURRENCY", ge=1, le=BRIDGE_CONCURRENCY_MAX)
    bridge_turns_per_claim: int = Field(8, alias="VTL_BRIDGE_TURNS_PER_CLAIM", ge=1, le=10000)
    bridge_replica_id: str | None = Field(
        None, alias="VTL_BRIDGE_REPLICA_ID", pattern=r"^[A-Za-z0-9_.:@+=-]{1,64}$"
    )
    bridge_heartbeat_interval: float = Field(1.0, alias="VTL_BRIDGE_HEARTBEAT_INTERVAL", gt=0, le=60)
    bridge_heartbeat_ttl: float = Field(5.0, alias="VTL_BRIDGE_HEARTBEAT_TTL", gt=0, le=600)
    # A dead worker's viewer is taken over after this long: keep it above LETTA_TIMEOUT so a turn
    # the dead worker started has reached the agent's history before anyone looks for it.
    bridge_lock_ttl: float = Field(45.0, alias="VTL_BRIDGE_LOCK_TTL", ge=0.5, le=3600)
    bridge_sweep_interval: float = Field(3.0, alias="VTL_BRIDGE_SWEEP_INTERVAL", gt=0, le=600)
    bridge_poll_timeout: float = Field(1.0, alias="VTL_BRIDGE_POLL_TIMEOUT", ge=0.05, le=60)
    bridge_done_ttl: int = Field(86400, alias="VTL_BRIDGE_DONE_TTL", ge=60)
    bridge_retry_base_delay: float = Field(0.5, alias="VTL_BRIDGE_RETRY_BASE_DELAY", ge=0, le=60)
    bridge_retry_max_delay: float = Field(30.0, alias="VTL_BRIDGE_RETRY_MAX_DELAY", ge=0, le=3600)
    # After Letta was found down, new tasks go straight to the fallback for this long.
    bridge_letta_down_hold: float = Field(5.0, alias="VTL_BRIDGE_LETTA_DOWN_HOLD", ge=0, le=3600)
    bridge_grace_period: float = Field(20.0, alias="VTL_BRIDGE_GRACE_PERIOD", ge=0, le=3600)
    bridge_metrics_port: int = Field(9478, alias="VTL_BRIDGE_METRICS_PORT", ge=0, le=65535)  # 0 = off
    # Loopback by default; 0.0.0.0 inside a container so Prometheus can scrape it.
    bridge_metrics_host: str = Field("127.0.0.1", alias="VTL_BRIDGE_METRICS_HOST")
    bridge_dead_letter_max: int = Field(10000, alias="VTL_BRIDGE_DEAD_LETTER_MAX", ge=1)
    # ... and at most this many bytes (the oldest go first; the newest is always kept).
    bridge_dead_letters_max_bytes: int = Field(64 * 1024 * 1024, alias="VTL_BRIDGE_DEAD_LETTERS_MAX_BYTES", ge=1)
    # A chat task (not a live event) that waited longer than this in its viewer's queue when its turn
    # comes is not answered late: it ends `stale` (counted, published empty). Seconds; 0 = never.
    bridge_stale_chat_after: float = Field(120.0, alias="VTL_BRIDGE_STALE_CHAT_AFTER", ge=0)
    # A viewer queue holding this many tasks takes no more chat (dead-lettered at intake, with the
    # reason); live events are always queued.
    bridge_viewer_queue_max: int = Field(50, alias="VTL_BRIDGE_VIEWER_QUEUE_MAX", ge=1)
    # Live events that also get an agent turn (all are always recorded in the viewer's stats).
    bridge_event_turns: set[Literal["super_chat", "gift", "membership", "enter"]] = Field(
        default_factory=lambda: {"super_chat", "gift", "membership", "enter"}, alias="VTL_BRIDGE_EVENT_TURNS"
    )
    # Search the viewer's long-term memory (tier 2) with their message before the turn and send the
    # closest passages with it (bridge/recall_prefetch.py): an old fact costs no tool step.
    bridge_recall_before_turn: bool = Field(True, alias="VTL_BRIDGE_RECALL_BEFORE_TURN")
    # ===================== end of bridge section =====================

    @field_validator("letta_api_url", "openai_base_url", "ollama_base_url", "memory_gate_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL with a host, got {value!r}")
        if parts.port is None and ":" in parts.netloc.rsplit("]", 1)[-1]:
            raise ValueError(f"has an invalid port: {value!r}")
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
            raise ValueError(f"must look like redis://host:port/db, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_model_source(self) -> "Settings":
        if self.openai_base_url and not self.openai_api_key:
            raise ValueError("OPENAI_BASE_URL is set but OPENAI_API_KEY is not (use any non-empty key for a local endpoint)")
        return self

    # --- bridge section (validator) ---
    @model_validator(mode="after")
    def _bridge_timings(self) -> "Settings":
        if self.bridge_heartbeat_interval >= self.bridge_heartbeat_ttl:
            raise ValueError("VTL_BRIDGE_HEARTBEAT_INTERVAL must be shorter than VTL_BRIDGE_HEARTBEAT_TTL")
        if self.bridge_retry_base_delay > self.bridge_retry_max_delay:
            raise ValueError("VTL_BRIDGE_RETRY_BASE_DELAY must not exceed VTL_BRIDGE_RETRY_MAX_DELAY")
        if self.bridge_concurrency is None:
            self.bridge_concurrency = min(BRIDGE_CONCURRENCY_MAX,
                                          self.bridge_concurrency_per_letta_worker * self.letta_workers)
        return self

    @property
    def bridge_uploads_path(self) -> Path:
        """The only folder the bridge reads `input_file` from."""
        return self.bridge_uploads_dir if self.bridge_uploads_dir is not None else self.data_dir / "uploads"
    # --- end of bridge section ---

    # ---------- derived values ----------
    @property
    def letta_host(self) -> str:
        return urlsplit(self.letta_api_url).hostname or "127.0.0.1"

    @property
    def letta_port(self) -> int:
        parts = urlsplit(self.letta_api_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def redis_address(self) -> tuple[str, int]:
        if self.redis_url:
            parts = urlsplit(self.redis_url)
            return parts.hostname or "127.0.0.1", parts.port or 6379
        return self.redis_host, self.redis_port

    @property
    def redis_secret(self) -> str | None:
        """The Redis password clients send (and the local stack's Redis requires): the one in
        REDIS_URL if it has one, else REDIS_PASSWORD."""
        if self.redis_url:
            in_url = urlsplit(self.redis_url).password
            if in_url:
                return unquote(in_url)
        return self.redis_password.get_secret_value() if self.redis_password else None

    @property
    def redis_connection_url(self) -> str:
        """A redis:// URL for clients, with the password (REDIS_PASSWORD also applies to a REDIS_URL
        without one, so docker compose can give the URL and the password separately)."""
        secret = self.redis_secret
        if self.redis_url:
            parts = urlsplit(self.redis_url)
            if not self.redis_password or parts.password or parts.scheme == "unix":
                return self.redis_url
            user = quote(unquote(parts.username), safe="") if parts.username else ""
            host = parts.netloc.rsplit("@", 1)[-1]
            return urlunsplit(parts._replace(netloc=f"{user}:{quote(secret, safe='')}@{host}"))
        auth = f":{quote(secret, safe='')}@" if secret else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/0"

    @property
    def uses_real_model(self) -> bool:
        """True when the user configured their own model endpoint (never the scripted stand-in)."""
        return bool(self.openai_base_url or self.ollama_base_url or self.openai_api_key)

    @property
    def scripted_model_base_url(self) -> str:
        return f"http://127.0.0.1:{self.scripted_model_port}/v1"

    @property
    def letta_dir(self) -> Path:
        return self.data_dir / "letta"

    @property
    def password_file(self) -> Path:
        return self.letta_dir / "config" / "server-password"

    @cached_property
    def letta_password(self) -> str:
        """The Letta server password: LETTA_API_KEY, else one generated once for the local stack.

        The generated one is kept (mode 0600) under data/letta/config so the stack
        and every client on this machine agree without a secret in any committed file.
        """
        if self.letta_api_key:
            return self.letta_api_key.get_secret_value()
        return _generated_secret(self.password_file)

    @property
    def memory_gate_address(self) -> tuple[str, int]:
        """Where the gate listens: VTL_MEMORY_GATE_LISTEN (e.g. 0.0.0.0:8285 in a container), else the URL's."""
        if self.memory_gate_listen:
            host, _, port = self.memory_gate_listen.rpartition(":")
            return host or "127.0.0.1", int(port)
        parts = urlsplit(self.memory_gate_url)
        return parts.hostname or "127.0.0.1", parts.port or 80

    @cached_property
    def memory_gate_secret(self) -> str:
        """VTL_MEMORY_GATE_SECRET, else one generated once (mode 0600) beside the Letta password."""
        if self.memory_gate_secret_value:
            return self.memory_gate_secret_value.get_secret_value()
        return _generated_secret(self.letta_dir / "config" / "memory-gate-secret")

    @property
    def console_password_file(self) -> Path:
        return self.letta_dir / "config" / "console-password"

    @property
    def console_password_hint(self) -> str:
        """Where the console password is (never the password itself), for the messages that say so."""
        return "VTL_CONSOLE_PASSWORD" if self.console_password_value else f"the file {self.console_password_file}"

    @cached_property
    def console_password(self) -> str:
        """VTL_CONSOLE_PASSWORD, else one generated once (mode 0600) in console_password_file."""
        if self.console_password_value:
            return self.console_password_value.get_secret_value()
        return _generated_secret(self.console_password_file)

    def resolved_model_handle(self) -> str:
        if self.letta_model:
            return self.letta_model
        if self.uses_real_model:
            raise SettingsError(
                "LETTA_MODEL must name a model handle (e.g. openai-proxy/gpt-4o-mini) when a real model endpoint is configured"
            )
        return f"openai-proxy/{SCRIPTED_MODEL_ID}"

    def resolved_embedding_handle(self) -> str:
        return self.letta_embedding or f"openai/{EMBEDDING_MODEL_ID}"


def _generated_secret(path: Path) -> str:
    """The secret kept in path, generated (mode 0600) on first use; the first writer wins a race."""
    if not path.exists():
        private_dir(path.parent)
        create_private(path, secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


def load_settings(**overrides) -> Settings:
    """Build Settings, turning a validation error into an exit that names the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err.get("loc") or ()
            field = str(loc[0]) if loc else ""
            env_name = _env_name(field)
            where = f"{env_name}: " if env_name else ""
            lines.append(f"  {where}{err.get('msg')} (got {err.get('input')!r})" if field else f"  {err.get('msg')}")
        raise SettingsError("invalid configuration:\n" + "\n".join(lines)) from None


def _env_name(field: str) -> str:
    info = Settings.model_fields.get(field)
    if info is not None and info.alias:
        return info.alias
    for info in Settings.model_fields.values():
        if info.alias == field:
            return field
    return field.upper()
