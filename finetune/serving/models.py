"""The models the answer engine generates with: one loaded base, the adapters loaded onto it, full fine-tunes.

Adapters are PEFT LoRA folders loaded once each under their version name and switched with set_adapter;
"base" runs with adapters disabled. The most recently used `adapter_cache_size` stay loaded. A full fine-tune
(method "full") is loaded as a second model beside the base (one at a time: it is as large as the base).
An adapter that fails to load is remembered with its error; the base answers in its place, with a notice.

Only the generation thread calls `choose` (it changes the model); `passages_for` may be called from any.
Assumption: adapters in the registry were trained on this engine's base model.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from pathlib import Path

from finetune.model.loading import load_base_model
from finetune.registry.candidates import passages_of
from finetune.serving.scheduler import ModelChoice
from store import StoreError
from store.adapters import get_adapter

log = logging.getLogger(__name__)


class ServedModels:
    def __init__(self, model, *, base_model: str, adapter_cache_size: int, k: int):
        self.model = model  # the base model, wrapped in a PeftModel once an adapter is loaded
        self.base_model = base_model
        self.adapter_cache_size = adapter_cache_size
        self.k = k  # passages per prompt for the base model
        self._loaded_adapters: OrderedDict[str, str] = OrderedDict()  # version -> path, LRU order
        self._failed_adapters: dict[str, str] = {}  # version -> error
        self._full_models: OrderedDict[str, object] = OrderedDict()  # version -> model (method "full")
        self._passages: dict[str, int] = {}  # version -> passages per prompt it was trained with

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._loaded_adapters)

    def passages_for(self, db, version: str | None) -> int:
        """Passages in the prompt: as many as the adapter was trained with; the engine's k for the base."""
        if version is None:
            return self.k
        if version not in self._passages:
            try:
                self._passages[version] = passages_of(get_adapter(db, version))
            except StoreError:  # unknown version: the caller hears about it elsewhere
                return self.k
        return self._passages[version]

    def choose(self, db, version: str | None) -> ModelChoice:
        """The model that answers for `version` (None: the base), loading it first if needed."""
        if version is None:
            return ModelChoice(self.model, None, (), self._adapters_off())
        if version in self._full_models:
            self._full_models.move_to_end(version)
            return ModelChoice(self._full_models[version], version)
        if version not in self._loaded_adapters:
            error = self._load_adapter(db, version)
            if error:
                notice = f"adapter {version} could not be loaded ({error}); answered with the base model"
                return ModelChoice(self.model, None, (notice,), self._adapters_off())
            if version in self._full_models:
                return ModelChoice(self._full_models[version], version)
        self._loaded_adapters.move_to_end(version)
        self.model.set_adapter(version)
        self._evict_adapters(keep=version)
        return ModelChoice(self.model, version)

    def _load_adapter(self, db, version: str) -> str | None:
        """Load a registered version once: a PEFT adapter onto the shared base, or a full fine-tune
        (method "full") as its own model. Returns an error text instead of raising."""
        if version in self._failed_adapters:
            return self._failed_adapters[version]

        record = None
        try:
            record = get_adapter(db, version)
            path = Path(record.path)
            if not (path / "adapter_config.json").exists():
                if not (path / "config.json").exists():
                    raise ValueError(f"{path} is neither a PEFT adapter nor a model folder")

                self._full_models[version] = load_base_model(str(path)).to(self._base_device()).eval()
                while len(self._full_models) > 1:  # a full model is as big as the base: keep one
                    self._full_models.popitem(last=False)
                log.info("engine: loaded full model %s from %s", version, path)
                return None
            from peft import PeftModel

            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=version, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=version,
                                                       is_trainable=False)
            self.model.eval()
            self._loaded_adapters[version] = str(path)
            log.info("engine: loaded adapter %s from %s", version, path)
            return None
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if record is not None and record.base_model != self.base_model:  # the likely cause, named first
                error = f"it was trained on {record.base_model!r}, this engine runs {self.base_model!r}: {error}"
            log.error("engine: adapter %s could not be loaded: %s", version, error)
            self._failed_adapters[version] = error
            return error

    def _base_device(self):
        return next(self.model.parameters()).device

    def _adapters_off(self):
        """The base model's behaviour: PEFT's disable_adapter context once adapters are loaded."""
        if self._loaded_adapters:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def _evict_adapters(self, *, keep: str) -> None:
        while len(self._loaded_adapters) > max(1, self.adapter_cache_size):
            oldest = next(v for v in self._loaded_adapters if v != keep)
            self.model.delete_adapter(oldest)
            del self._loaded_adapters[oldest]
            log.info("engine: unloaded adapter %s", oldest)
