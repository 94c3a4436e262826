"""Configuration from the environment (``MOLAL_*`` and the Label Studio names) and flags.

Secrets are :class:`pydantic.SecretStr`: they print as ``**********`` in reprs, logs and errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: the student's default cap on optimiser steps per training (whole epochs; the served and the simulated loop)
STUDENT_MAX_STEPS = 30_000
#: tasks at the head of the queue whose rank and review line a job writes itself before it reports done (the
#: rest: a background job); Label Studio updates task data one PATCH at a time, ~0.1 s each on 2 cores
QUEUE_HEAD = 100
#: retrain after this many new human labels (once a model serves): the queue keeps up with the people
TRAIN_EVERY = 25
#: seconds a superseded model version's predictions stay after the new one is published (molal.service.queue)
RETIRE_GRACE_S = 900


class Settings(BaseSettings):
    """Settings of the molal backend and CLI. Each field reads the environment variable named in it."""

    # hide_input_in_errors: a value that fails validation (a mistyped database URL) is not quoted in the error
    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True, env_ignore_empty=True,
                                      hide_input_in_errors=True)

    model_dir: Path = Field(Path("./molal-data"), validation_alias=AliasChoices("MODEL_DIR", "MOLAL_MODEL_DIR"))
    label_studio_url: str | None = Field(None, validation_alias=AliasChoices("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"))
    label_studio_api_key: SecretStr | None = Field(None, validation_alias="LABEL_STUDIO_API_KEY")
    basic_auth_user: str | None = Field(None, validation_alias="BASIC_AUTH_USER")
    basic_auth_pass: SecretStr | None = Field(None, validation_alias="BASIC_AUTH_PASS")
    redis_url: SecretStr | None = Field(None, validation_alias="REDIS_URL")
    database_url: SecretStr | None = Field(
        None, validation_alias="MOLAL_DATABASE_URL",
        description="postgresql://user:password@host:port/db: the job table, project state and annotation cache "
                    "live in PostgreSQL (processes on several hosts share it; MODEL_DIR then holds model files "
                    "only, on a volume every host mounts). Unset: SQLite files under MODEL_DIR (one host). "
                    "Percent-encode @ : / ? # % & and spaces in the password; a URL molal cannot read is refused "
                    "at start with an error that quotes none of it",
    )
    mixture: Path | None = Field(None, validation_alias="MOLAL_MIXTURE", description="mixture config file")
    device: str = Field("auto", validation_alias="MOLAL_DEVICE", description="auto|cpu|cuda")
    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")
    train_every: int = Field(
        TRAIN_EVERY, ge=0, validation_alias="MOLAL_TRAIN_EVERY",
        description="retrain after N new human labels, once a model serves (0 = only on Start Training): the queue "
                    "is re-ranked with the people's latest labels; one training job each time (≈ 30-40 s for "
                    "2,000 tasks on 2 cores)")
    retire_grace_s: int = Field(
        RETIRE_GRACE_S, ge=0, validation_alias="MOLAL_RETIRE_GRACE_S",
        description="a superseded model version's predictions stay this long after the new one is published "
                    "before molal deletes them: a person who opened a task pre-filled from the old version "
                    "submits an annotation that points to that prediction, and Label Studio refuses it (HTTP 400) "
                    "once the prediction is gone. Deleted by the first job, or the first label, after that")
    job_nice: int = Field(
        10, ge=0, le=19, validation_alias="MOLAL_JOB_NICE",
        description="jobs (training, the queue writer) run this much nicer than the requests (Linux niceness): "
                    "the people labelling meanwhile, /predict and a Label Studio on the same cores go first")
    loop_mode: Literal["review", "human_free"] = Field("review", validation_alias="MOLAL_LOOP_MODE")
    strategy: str = Field("entropy", validation_alias="MOLAL_STRATEGY")
    query_batch: int = Field(50, validation_alias="MOLAL_QUERY_BATCH")
    human_per_round: int = Field(
        0, ge=0, validation_alias="MOLAL_HUMAN_PER_ROUND",
        description="human_free loop: of each queried batch, the N tasks with MoLAM's least confident labels "
                    "go to people instead of being auto-labelled (the hybrid loop of molal simulate)",
    )
    priority_field: str = Field("priority", validation_alias="MOLAL_PRIORITY_FIELD")
    priority_top: int = Field(
        QUEUE_HEAD, ge=0, validation_alias="MOLAL_PRIORITY_TOP",
        description="the head of the queue: a job writes the rank, priority and review line of the top N "
                    "unlabeled tasks itself, and those of every other task in a background job (0 = all in the "
                    "job). Label Studio updates task data one PATCH at a time, ~0.1 s each",
    )
    predictions_top: int = Field(
        20_000, ge=0, validation_alias="MOLAL_PREDICTIONS_TOP",
        description="a job imports the served model's predictions for the head of the queue only: the top N "
                    "unlabeled tasks by priority (0 = every task). Label Studio asks /predict for any other task "
                    "when a person opens it; its import slows with every prediction a project holds",
    )
    per_llm_predictions: bool = Field(True, validation_alias="MOLAL_PER_LLM_PREDICTIONS")
    per_llm_max_tasks: int = Field(
        20_000, ge=0, validation_alias="MOLAL_PER_LLM_MAX_TASKS",
        description="import per-LLM predictions only in projects of at most this many tasks (0 = any size): "
                    "Label Studio's prediction import slows with every prediction a project holds (bench/scale.py: "
                    "≈ 1.5 h for 4 per task at 100k tasks); the review fields still show each LLM's vote",
    )
    max_annotate_usd: float | None = Field(
        None, ge=0, validation_alias="MOLAL_MAX_ANNOTATE_USD",
        description="refuse a training or sync job whose annotation of the project is estimated above this many "
                    "US dollars (paid APIs priced with usd_per_mtok_prompt/_completion; unpriced ones are refused)",
    )
    max_annotate_hours: float | None = Field(
        None, gt=0, validation_alias="MOLAL_MAX_ANNOTATE_HOURS",
        description="refuse a training or sync job whose annotation is estimated above this many hours (timed on "
                    "8 uncached texts, which are then cached)",
    )
    engine: Literal["local", "ray"] = Field(
        "local", validation_alias="MOLAL_ENGINE",
        description="how training, sync and annotate jobs annotate a project: 'local' (in the job's process) or "
                    "'ray' (Ray Data actors, pip install 'molal[ray]'; for pools of at least MOLAL_ENGINE_MIN_TEXTS)",
    )
    engine_min_texts: int = Field(2000, ge=0, validation_alias="MOLAL_ENGINE_MIN_TEXTS",
                                  description="smaller pools are annotated in the job's process even with engine=ray")
    ray_address: str | None = Field(None, validation_alias="MOLAL_RAY_ADDRESS",
                                    description="a running Ray cluster ('auto', 'ray://head:10001'); unset: a local one")
    ray_workers: int = Field(2, ge=1, le=4096, validation_alias="MOLAL_RAY_WORKERS",
                             description="annotation actors (each loads the mixture's models once)")
    ray_gpus_per_worker: float = Field(0.0, ge=0, validation_alias="MOLAL_RAY_GPUS_PER_WORKER")
    predict_time_budget_s: float = Field(60.0, validation_alias="MOLAL_PREDICT_BUDGET_S")
    embedding_store_mb: float = Field(
        1024, ge=0, validation_alias="MOLAL_EMBEDDING_STORE_MB",
        description="the text embeddings kept beside the annotation cache (same SQLite file or PostgreSQL "
                    "database), so a retrain, another worker or a restart does not embed a text again: at most "
                    "this many MB, least recently used evicted first (0 = off: embeddings kept in memory only)",
    )
    student_encoder: str = Field("minilm", validation_alias="MOLAL_STUDENT_ENCODER")
    student_epochs: int = Field(3, validation_alias="MOLAL_STUDENT_EPOCHS")
    student_max_length: int = Field(64, validation_alias="MOLAL_STUDENT_MAX_LENGTH")
    student_max_steps: int = Field(
        STUDENT_MAX_STEPS, ge=0, validation_alias="MOLAL_STUDENT_MAX_STEPS",
        description="at most this many optimiser steps per student training, in whole epochs (at least one; "
                    "0 = off): 30 epochs of a 100k-task project would be 187,500 steps (bench/student_steps.py: "
                    "5 epochs of 10k texts score as 30 do)",
    )
    student_lr: float | None = Field(
        None, gt=0, validation_alias="MOLAL_STUDENT_LR",
        description="the student's learning rate; unset = 5e-5 when fine-tuning, 1e-3 for a frozen encoder's head",
    )
    student_freeze_encoder: bool = Field(
        False, validation_alias="MOLAL_STUDENT_FREEZE_ENCODER",
        description="train only the classification head on frozen encoder embeddings (fast CPU preset)",
    )
    warm_start: bool = Field(
        False, validation_alias="MOLAL_WARM_START",
        description="when the job worker starts, import the training stack (scikit-learn, XGBoost, torch, "
                    "transformers) in the background so the first training job does not wait for it; off by "
                    "default: while it runs (6-9 s of CPU) the backend answers Label Studio's 3 s /setup and "
                    "1 s /health checks slowly (GET /health reports it as 'warm')",
    )
    serve_model: Literal["molam", "student"] = Field("molam", validation_alias="MOLAL_SERVE_MODEL")
    molam_text_features: str | None = Field(
        None, validation_alias="MOLAL_MOLAM_TEXT_FEATURES",
        description="correct MoLAM with its transductive text model on this encoder ('minilm' = bundled; off by default)",
    )
    # -- security: who may call, what may be trusted (README "Deploying safely") ----------------------------
    insecure_no_auth: bool = Field(
        False, validation_alias="MOLAL_INSECURE_NO_AUTH",
        description="allow serving beyond loopback without BASIC_AUTH_USER/PASS (anyone who reaches the port "
                    "can then write project settings and start training)",
    )
    trust_setup_hostname: bool = Field(
        False, validation_alias="MOLAL_TRUST_SETUP_HOSTNAME",
        description="without LABEL_STUDIO_URL, talk to the hostname Label Studio sends in /setup (with the token "
                    "of that same /setup, never LABEL_STUDIO_API_KEY)",
    )
    allowed_hosts: str | None = Field(
        None, validation_alias="MOLAL_ALLOWED_HOSTS",
        description="comma list of Host header values accepted (default without auth: localhost and loopback "
                    "addresses only, against DNS rebinding; '*' accepts any)",
    )
    # -- limits (413/422 with a message naming the variable) -------------------------------------------------
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, validation_alias="MOLAL_MAX_BODY_BYTES",
                                description="largest request body accepted")
    max_tasks: int = Field(10_000, ge=1, validation_alias="MOLAL_MAX_TASKS",
                           description="most tasks in one /predict request")
    max_text_chars: int = Field(32_000, ge=1, validation_alias="MOLAL_MAX_TEXT_CHARS",
                                description="longest task text annotated (longer ones get an error entry)")
    max_classes: int = Field(200, ge=2, validation_alias="MOLAL_MAX_CLASSES",
                             description="most <Choice> values in a served <Choices>")
    max_label_config_chars: int = Field(200_000, ge=100, validation_alias="MOLAL_MAX_LABEL_CONFIG_CHARS",
                                        description="longest label config accepted")
    label_config_budget_s: float = Field(
        2.0, gt=0, validation_alias="MOLAL_LABEL_CONFIG_BUDGET_S",
        description="longest time parsing a new label config may take (Label Studio gives /setup 3 s); a config "
                    "parsed before is remembered and costs nothing",
    )
    max_projects: int = Field(
        1000, ge=1, validation_alias="MOLAL_MAX_PROJECTS",
        description="most Label Studio projects this backend keeps state for; a new one beyond it is refused (507)",
    )
    request_timeout_s: float = Field(30.0, gt=0, validation_alias="MOLAL_REQUEST_TIMEOUT_S",
                                     description="time a client has to send a whole request (headers and body)")
    response_timeout_s: float = Field(60.0, gt=0, validation_alias="MOLAL_RESPONSE_TIMEOUT_S",
                                      description="time a client has to read a whole response (then the "
                                                  "connection is closed)")
    task_file_max_bytes: int = Field(1_000_000, validation_alias="MOLAL_TASK_FILE_MAX_BYTES",
                                     description="size cap of a Label Studio-hosted task text file")
    task_file_timeout_s: float = Field(10.0, validation_alias="MOLAL_TASK_FILE_TIMEOUT_S")

    @field_validator("database_url", mode="before")
    @classmethod
    def _parse_database_url(cls, value: object) -> object:
        """Parse the URL before anything else touches it (:func:`molal.db.parse_pg_url`): a URL molal cannot read
        fails here, with a message that names no part of it, and its password is registered for redaction."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or raw == "":
            return value
        from molal.db import parse_pg_url

        parse_pg_url(raw, "MOLAL_DATABASE_URL")
        return value


class SettingsError(ValueError):
    """A setting (an environment variable or a flag) has a value molal cannot use. The message names each
    variable and what is wrong, never the value (it may be a secret, or hold one)."""


def get_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (e.g. CLI flags) taking precedence.
    :class:`SettingsError` (one line per bad setting) for values molal cannot use."""
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for e in exc.errors(include_input=False, include_url=False, include_context=False):
            where = ".".join(str(x) for x in e.get("loc", ())) or "settings"
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            lines.append(msg if msg.startswith(where) else f"{where}: {msg}")
    # raised outside the handler: pydantic's error keeps each input (``errors()``) and is not chained here
    raise SettingsError("; ".join(lines))


def is_loopback_bind(address: str) -> bool:
    """Whether a bind address (``host:port``, ``[v6]:port``, a bare host, ``unix:...``) only listens on this
    machine: a unix socket, ``localhost``, 127.0.0.0/8 or ::1."""
    import ipaddress

    if address.startswith(("unix:", "fd://")):
        return True
    if address.startswith("["):
        host = address[1:address.index("]")] if "]" in address else address
    else:
        host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_refusal(settings: Settings, binds: list[str]) -> str | None:
    """Why the server must not start on ``binds`` (None: it may): listening beyond loopback needs basic auth,
    unless ``MOLAL_INSECURE_NO_AUTH`` says otherwise."""
    exposed = [b for b in binds if not is_loopback_bind(b)]
    if not exposed or (settings.basic_auth_user and settings.basic_auth_pass is not None) or settings.insecure_no_auth:
        return None
    return (f"refusing to listen on {', '.join(exposed)} without authentication: anyone who can reach it could "
            "change project settings and start training. Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and enter them "
            "in Label Studio's Connect Model dialog), listen on 127.0.0.1 behind a proxy, or accept the risk with "
            "MOLAL_INSECURE_NO_AUTH=true (molal serve --insecure-no-auth)")

