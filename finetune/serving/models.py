"""The models the answer engine generates with: one loaded base, the adapters loaded onto it, full fine-tunes.

Adapters are PEFT LoRA folders loaded once each under their version name onto the one base (a PeftModel
holding them all). Nothing is switched: each row of a running batch names its own adapter, or none for the
base (finetune.serving.scheduler, kv_cache.RunningBatch), so the base and every loaded adapter share one batch
(`batch_key`). A row keeps its adapter loaded while it runs (`ModelChoice.scope`); of the adapters no row uses,
the least recently chosen are unloaded beyond `adapter_cache_size` (so the cache holds more while more are in
use). A full fine-tune (method "full") is loaded as a second model beside the base (one at a time: it is as
large as the base) and runs in batches of its own. An adapter that fails to load is remembered with its
error; the base answers in its place, with a notice.

Only the generation thread calls `choose`, `batch_key` and the scopes (they change the model); `passages_for`
and `loaded_adapters` may be called from any. Assumption: adapters in the registry were trained on this
engine's base model.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, OrderedDict
from pathlib import Path

from finetune.model.loading import load_base_model
from finetune.serving.scheduler import ModelChoice
from store import StoreError
from store.adapters import get_adapter, passages_of

log = logging.getLogger(__name__)

# The batch key of the base and every adapter on it: their rows share one running batch.
SHARED_BASE = "base and adapters"


class ServedModels:
    def __init__(self, model, *, base_model: str, adapter_cache_size: int, k: int):
        self.model = model  # the base model, wrapped in a PeftModel once an adapter is loaded
        self.base_model = base_model
        self.adapter_cache_size = adapter_cache_size
        self.k = k  # passages per prompt for the base model
        self._loaded_adapters: OrderedDict[str, str] = OrderedDict()  # version -> path, LRU order
        self._failed_adapters: dict[str, str] = {}  # version -> error
        self._full_models: OrderedDict[str, object] = OrderedDict()  # version -> model (method "full")
        self._rows: Counter[str] = Counter()  # version -> running rows on that adapter
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

    def batch_key(self, db, version: str | None):
        """Rows of versions with one key may share a running batch: SHARED_BASE for the base and every LoRA
        adapter (also one that will fail to load: the base answers for it), the version for a full fine-tune.
        Loads nothing."""
        if version is None or version in self._loaded_adapters or version in self._failed_adapters:
            return SHARED_BASE
        if version in self._full_models:
            return version
        try:
            path = Path(get_adapter(db, version).path)
        except StoreError:  # choose() reports it
            return SHARED_BASE
        return version if _is_full_model(path) else SHARED_BASE

    def choose(self, db, version: str | None) -> ModelChoice:
        """The model that answers for `version` (None: the base) and the row's adapter on it, loading it first if
        needed. The choice's scope keeps the adapter loaded while the row runs."""
        from finetune.serving.kv_cache import PEFT_BASE  # imports torch: loaded with the model

        if version is None:
            return ModelChoice(self.model, None, adapter=PEFT_BASE)
        if version in self._full_models:
            self._full_models.move_to_end(version)
            return ModelChoice(self._full_models[version], version)
        if version not in self._loaded_adapters:
            error = self._load_adapter(db, version)
            if error:
                notice = f"adapter {version} could not be loaded ({error}); answered with the base model"
                return ModelChoice(self.model, None, (notice,), adapter=PEFT_BASE)
            if version in self._full_models:
                return ModelChoice(self._full_models[version], version)
        self._loaded_adapters.move_to_end(version)
        self._evict_adapters(keep=version)
        return ModelChoice(self.model, version, adapter=version, scope=self._in_use(version))

    @contextlib.contextmanager
    def _in_use(self, version: str):
        """Held by each running row on adapter `version`: it is not unloaded meanwhile."""
        self._rows[version] += 1
        try:
            yield
        finally:
            self._rows[version] -= 1
            if not self._rows[version]:
                del self._rows[version]
            self._evict_adapters()

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
                if not _is_full_model(path):
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

    def _evict_adapters(self, *, keep: str | None = None) -> None:
        """Unload the least recently chosen adapters that no running row uses (nor `keep`) beyond the cache's size."""
        while len(self._loaded_adapters) > max(1, self.adapter_cache_size):
            idle = [v for v in self._loaded_adapters if v != keep and not self._rows[v]]
            if not idle:  # every adapter loaded is answering: they stay until their rows leave
                return
            self.model.delete_adapter(idle[0])
            del self._loaded_adapters[idle[0]]
            log.info("engine: unloaded adapter %s", idle[0])


def _is_full_model(folder: Path) -> bool:
    """A registered version that is a model of its own (method "full"), not a PEFT adapter."""
    return not (folder / "adapter_config.json").exists() and (folder / "config.json").exists()
