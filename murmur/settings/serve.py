"""Settings of the server (`murmur serve`) and the inference engine behind it."""

from typing import Literal

from pydantic import Field

from murmur.settings.assistant import AssistantSettings
from murmur.settings.base import Section


class ServeSettings(Section):
    """Where to listen, who may call, and how many requests run at once."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_name: str | None = Field(None, description="name clients use in `model`; default the folder's name")
    api_keys: list[str] = Field(default_factory=list, description="accepted Bearer keys; empty = no auth "
                                "(MURMUR_API_KEYS adds comma-separated keys)")
    rate_limit_per_minute: int = Field(0, ge=0, description="requests per minute per key (or client); 0 = off")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(16, ge=1, description="requests decoded together (KV-cache slots)")
    max_queue: int = Field(256, ge=1, description="requests waiting for a slot before 429")
    compile: bool = Field(False, description="compile the decode step with torch.compile: faster decoding "
                          "after a warm-up compilation at start-up (15-20 s for tiny-cpu on 2 CPU cores)")
    quantize: Literal["none", "int8"] = Field("none", description="int8: linear layers' weights as int8 with a "
                                              "scale per output channel (a quarter of float32's bytes; "
                                              "quality cost in docs/serve.md)")
    max_seq_len: int | None = Field(None, ge=2, description="context per request; default the model's")
    kv_cache_memory_fraction: float = Field(0.5, gt=0, le=1, description="share of the memory free at start-up "
                                            "(GPU: free device memory; CPU: MemAvailable) the KV cache may take")
    kv_cache_bytes: int | None = Field(None, ge=1, description="KV-cache budget in bytes, instead of the fraction")
    prefix_cache: int = Field(8, ge=0, description="system-prompt prefixes whose keys/values are kept; 0 = off")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    default_max_tokens: int | None = Field(None, ge=1, description="when a request gives none; None = to context")
    health_timeout_s: float = Field(10.0, gt=0, description="/health fails when a 1-token probe takes longer")
    stuck_after_s: float = Field(60.0, gt=0, description="a busy engine with no finished step this long is stuck")
    shutdown_grace_s: float = Field(10.0, ge=0, description="on shutdown, time in-flight requests get to finish")

    # Work one request may ask for, refused with 400 before any of it is done.
    max_prompts: int = Field(64, ge=1, description="texts in one completions `prompt` list")
    max_messages: int = Field(1000, ge=1, description="messages in one chat request (each costs template "
                              "tokens even when empty)")
    max_n: int = Field(16, ge=1, description="choices one request may ask for (`n`)")
    max_choices: int = Field(64, ge=1, description="prompts x n of one request: the engine requests it makes")
    max_prompt_chars: int = Field(200_000, ge=1, description="characters of prompt text (all prompts or "
                                  "messages of a request together), refused before tokenizing")
    max_reply_tokens: int = Field(4096, ge=1, description="max_tokens one choice may ask for; also caps the "
                                  "reply length of a request that gives none")

    # Connections: slow or numerous clients cannot hold the server.
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send a request's headers within "
                                    "this long of opening (or of its previous response), or it is closed")
    body_timeout_s: float = Field(30.0, gt=0, description="a request's body must arrive within this long (408)")
    keep_alive_timeout_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(512, ge=1, description="open connections beyond this get 503 for every route "
                                 "but /health and /metrics")
    rate_limit_max_clients: int = Field(10_000, ge=1, description="clients the rate limiter remembers; the least "
                                        "recently seen are forgotten first")
    trusted_proxies: list[str] = Field(default_factory=list, description="addresses whose X-Forwarded-For is "
                                       "believed (the client address rate limits key on); empty = none")

    # Browsers: which Host names and which other web origins may reach the API.
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names accepted besides localhost, "
                                     "address literals and the bind address; [\"*\"] = any")
    allowed_origins: list[str] = Field(default_factory=list, description="web origins allowed cross-origin "
                                       "access (CORS); empty = none")

    # The in-app assistant: chat grounded in the post index, citations, mentions (docs/assistant.md).
    assistant: AssistantSettings = Field(default_factory=AssistantSettings)
