"""The answer engine as the settings describe it: the base model, the workspace, and vLLM when
KBLOOP_VLLM_URL is set. Every command that answers questions builds its engine here."""

from __future__ import annotations

from dataclasses import replace

from finetune.serving.engine import Engine, EngineConfig
from finetune.serving.vllm import VllmTarget
from kbloop.settings import Settings


def vllm_target(settings: Settings) -> VllmTarget | None:
    """Where generation goes when KBLOOP_VLLM_URL is set; None: in this process."""
    if settings.vllm_url is None:
        return None
    return VllmTarget(url=settings.vllm_url, model=settings.vllm_model or settings.base_model,
                      adapter_dir=settings.vllm_adapter_dir)


def engine_for(settings: Settings, config: EngineConfig | None = None) -> Engine:
    """An engine, not started yet, for these settings; `config` for the rest (k, limits, batching)."""
    config = replace(config or EngineConfig(), vllm=vllm_target(settings))
    return Engine(db_path=settings.db_path, home=settings.kbloop_home, base_model=settings.base_model, config=config)
