"""Configuration from the environment (``MOLAL_*`` and the Label Studio names) and flags.

Secrets are :class:`pydantic.SecretStr`: they print as ``**********`` in reprs, logs and errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of the molal backend and CLI. Each field reads the environment variable named in it."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True, env_ignore_empty=True)

    model_dir: Path = Field(Path("./molal-data"), validation_alias=AliasChoices("MODEL_DIR", "MOLAL_MODEL_DIR"))
    label_studio_url: str | None = Field(None, validation_alias=AliasChoices("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"))
    label_studio_api_key: SecretStr | None = Field(None, validation_alias="LABEL_STUDIO_API_KEY")
    basic_auth_user: str | None = Field(None, validation_alias="BASIC_AUTH_USER")
    basic_auth_pass: SecretStr | None = Field(None, validation_alias="BASIC_AUTH_PASS")
    redis_url: SecretStr | None = Field(None, validation_alias="REDIS_URL")
    mixture: Path | None = Field(None, validation_alias="MOLAL_MIXTURE", description="mixture config file")
    device: str = Field("auto", validation_alias="MOLAL_DEVICE", description="auto|cpu|cuda")
    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")
    train_every: int = Field(0, validation_alias="MOLAL_TRAIN_EVERY", description="train after N new annotations (0=off)")
    loop_mode: Literal["review", "human_free"] = Field("review", validation_alias="MOLAL_LOOP_MODE")
    strategy: str = Field("entropy", validation_alias="MOLAL_STRATEGY")
    query_batch: int = Field(50, validation_alias="MOLAL_QUERY_BATCH")
    human_per_round: int = Field(
        0, ge=0, validation_alias="MOLAL_HUMAN_PER_ROUND",
        description="human_free loop: of each queried batch, the N tasks with MoLAM's least confident labels "
                    "go to people instead of being auto-labelled (the hybrid loop of molal simulate)",
    )
    priority_field: str = Field("priority", validation_alias="MOLAL_PRIORITY_FIELD")
    per_llm_predictions: bool = Field(True, validation_alias="MOLAL_PER_LLM_PREDICTIONS")
    predict_time_budget_s: float = Field(60.0, validation_alias="MOLAL_PREDICT_BUDGET_S")
    student_encoder: str = Field("minilm", validation_alias="MOLAL_STUDENT_ENCODER")
    student_epochs: int = Field(3, validation_alias="MOLAL_STUDENT_EPOCHS")
    student_max_length: int = Field(64, validation_alias="MOLAL_STUDENT_MAX_LENGTH")
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
    task_file_max_bytes: int = Field(1_000_000, validation_alias="MOLAL_TASK_FILE_MAX_BYTES",
                                     description="size cap of a Label Studio-hosted task text file")
    task_file_timeout_s: float = Field(10.0, validation_alias="MOLAL_TASK_FILE_TIMEOUT_S")


def get_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (e.g. CLI flags) taking precedence."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def redact(text: str, secrets: list[str | None]) -> str:
    """Replace every occurrence of each non-empty secret in ``text`` by ``***``."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text
