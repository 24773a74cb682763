"""Generation on a vLLM server, for deployments that outgrow one in-process model (docs/scaling.md).

With `KBLOOP_VLLM_URL` set, the engine keeps everything but the decoding: retrieval, verified answers, the
one prompt builder, trimming to the context window and recording. It sends vLLM the token ids of the prompt
it rendered (so training and serving still see the same text, tokenised once, by kbloop) to
`/v1/completions`, and streams the text back. Adapters are loaded into vLLM at run time under their version
names (`/v1/load_lora_adapter`; vLLM must run with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`)
and asked for by that name; the base model is asked for by `KBLOOP_VLLM_MODEL`.

vLLM reads an adapter from a path on its own machine: `KBLOOP_VLLM_ADAPTER_DIR` is `$KBLOOP_HOME/adapters`
as vLLM sees it (a shared volume mounted elsewhere); unset, vLLM is given kbloop's own paths.

Every failure is a `VllmError` whose message is one line naming the server and what it said.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from finetune.serving.scheduler import BackendClosed, Generated, GenerationRequest
from finetune.serving.streaming import TextStream, clean_answer
from store.errors import KbloopError

log = logging.getLogger(__name__)


class VllmError(KbloopError):
    """The vLLM server could not be reached or refused a request; the message says which and why."""


@dataclass(frozen=True)
class VllmTarget:
    """Where generation goes: vLLM's base URL (without /v1), the name it serves the base model under, and
    `$KBLOOP_HOME/adapters` as the vLLM machine sees it (None: the same path as here)."""

    url: str
    model: str
    adapter_dir: str | None = None
    connect_timeout_s: float = 5.0
    load_timeout_s: float = 120.0  # loading an adapter reads it from disk and may allocate GPU memory


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None  # "stop" (a stop token), "length" (max_tokens), None (our deadline cut it)


class VllmClient:
    """One vLLM server's HTTP API: health, adapters, completions. Thread-safe (httpx.Client is)."""

    def __init__(self, target: VllmTarget, *, adapters_dir: Path):
        self.target = target
        self.adapters_dir = Path(adapters_dir)
        self.base_url = target.url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url,
                                  timeout=httpx.Timeout(target.load_timeout_s, connect=target.connect_timeout_s))

    def close(self) -> None:
        self._http.close()

    # --- health and adapters ------------------------------------------------------------------------

    def health(self) -> str | None:
        """None when the server answers and serves `target.model`; else what is wrong, in one line."""
        try:
            self._request("GET", "/health", timeout=self.target.connect_timeout_s)
            served = self.served_models()
        except VllmError as exc:
            return str(exc)
        if self.target.model not in served:
            return (f"vLLM at {self.base_url} serves {', '.join(sorted(served)) or 'no model'}, not "
                    f"{self.target.model!r} (KBLOOP_VLLM_MODEL)")
        return None

    def served_models(self) -> dict[str, str | None]:
        """Every model name vLLM answers to, with its parent: None for a base, the base for a LoRA adapter."""
        body = self._json(self._request("GET", "/v1/models", timeout=self.target.connect_timeout_s))
        return {m["id"]: m.get("parent") for m in body.get("data", [])}

    def lora_path(self, path: Path) -> str:
        """`path` (an adapter folder under kbloop's adapters dir) as the vLLM machine sees it."""
        if self.target.adapter_dir is None:
            return str(Path(path).resolve())
        try:
            relative = Path(path).resolve().relative_to(self.adapters_dir.resolve())
        except ValueError:
            raise VllmError(f"adapter folder {path} is outside {self.adapters_dir}, so KBLOOP_VLLM_ADAPTER_DIR "
                            "cannot say where vLLM finds it") from None
        return str(Path(self.target.adapter_dir) / relative)

    def load_adapter(self, version: str, path: Path) -> None:
        """Load an adapter folder under its version name; loading one already loaded is not an error."""
        response = self._request("POST", "/v1/load_lora_adapter", check=False,
                                 json={"lora_name": version, "lora_path": self.lora_path(path)})
        if response.status_code == 200 or "already been loaded" in _message(response):
            return
        raise self._refused("/v1/load_lora_adapter", response, f"loading adapter {version}")

    def unload_adapter(self, version: str) -> None:
        """Unload an adapter; one vLLM does not have (a restart forgot it) is not an error."""
        response = self._request("POST", "/v1/unload_lora_adapter", check=False, json={"lora_name": version})
        if response.status_code in (200, 404) or "cannot be found" in _message(response):
            return
        raise self._refused("/v1/unload_lora_adapter", response, f"unloading adapter {version}")

    # --- generation ---------------------------------------------------------------------------------

    def complete(self, prompt_ids: list[int], *, model: str, max_tokens: int, stop_ids: list[int],
                 temperature: float = 0.0, deadline: float | None = None,
                 on_text: Callable[[str], None] | None = None) -> Completion:
        """Generate from token ids with `model` (the base's name or a loaded adapter's), streamed: each piece
        of text goes to `on_text` as it arrives. Stops at a stop token, `max_tokens`, or `deadline`
        (time.monotonic()), whichever comes first."""
        payload = {
            "model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "stop_token_ids": stop_ids, "skip_special_tokens": True,
        }
        pieces: list[str] = []
        finish = None
        # Waiting between tokens is bounded by the deadline (or not at all: vLLM may queue the request).
        wait = None if deadline is None else max(1.0, deadline - time.monotonic())
        timeout = httpx.Timeout(wait, connect=self.target.connect_timeout_s)
        try:
            with self._http.stream("POST", "/v1/completions", json=payload, timeout=timeout) as response:
                if response.status_code != 200:
                    response.read()
                    raise self._refused("/v1/completions", response, f"generating with {model}")
                for line in response.iter_lines():
                    if deadline is not None and time.monotonic() > deadline:
                        break
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:  # an error in the middle of a stream
                        raise VllmError(f"vLLM at {self.base_url}: generating with {model} failed: "
                                        f"{_error_text(event)}")
                    choice = event["choices"][0]
                    if choice.get("text"):
                        pieces.append(choice["text"])
                        if on_text is not None:
                            on_text(choice["text"])
                    finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        except (json.JSONDecodeError, KeyError, IndexError) as exc:
            raise VllmError(f"vLLM at {self.base_url}: /v1/completions sent a stream kbloop cannot read "
                            f"({type(exc).__name__}: {exc})") from None
        return Completion("".join(pieces), finish)

    # --- HTTP -----------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, check: bool = True, timeout: float | None = None,
                 **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, timeout=timeout or httpx.USE_CLIENT_DEFAULT, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if check and response.status_code != 200:
            raise self._refused(path, response, f"{method} {path}")
        return response

    def _json(self, response: httpx.Response) -> dict:
        try:
            return response.json()
        except ValueError:
            raise VllmError(f"vLLM at {self.base_url}: {response.request.url.path} did not answer JSON") from None

    def _unreachable(self, exc: Exception) -> VllmError:
        return VllmError(f"vLLM at {self.base_url} is unreachable ({type(exc).__name__}: {exc or 'no detail'})")

    def _refused(self, path: str, response: httpx.Response, doing: str) -> VllmError:
        return VllmError(f"vLLM at {self.base_url}: {doing} failed: {path} answered {response.status_code}: "
                         f"{_message(response) or 'no message'}")


def _message(response: httpx.Response) -> str:
    """The error text of a vLLM answer: {"message": ...} (OpenAI's older shape), {"error": {"message": ...}}
    (the newer one), or plain text (the adapter endpoints' successes and some failures)."""
    try:
        return _error_text(response.json())
    except ValueError:
        return response.text.strip()[:300]


def _error_text(body) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message", error))[:300]
        if error:
            return str(error)[:300]
        if "message" in body:
            return str(body["message"])[:300]
    return str(body)[:300]


class VllmBackend:
    """The engine's generation backend (finetune.serving.scheduler.GenerationBackend) on a vLLM server. Each
    request runs on a thread of its own: vLLM batches them continuously on its side.

    Adapters: a version is loaded into vLLM the first time a request needs it; the `adapter_cache_size` most
    recently used stay loaded and the others are unloaded once no request uses them. A version vLLM has
    forgotten (it restarted) is loaded again and the request retried once. A full fine-tune (no
    adapter_config.json) cannot be loaded into vLLM: the base answers, with a notice saying why.
    """

    def __init__(self, client: VllmClient, *, resolve: Callable[[str], str | None],
                 adapter_folder: Callable[[str], Path], stop_ids: list[int], max_new_tokens: int,
                 time_limit_s: float, do_sample: bool = False, temperature: float = 0.7,
                 adapter_cache_size: int = 3, concurrency: int = 32):
        self.client = client
        self.resolve = resolve  # "active" | "base" | version -> version (None: the base)
        self.adapter_folder = adapter_folder  # version -> its folder (raises StoreError when unknown)
        self.stop_ids = list(stop_ids)
        self.max_new_tokens = max_new_tokens
        self.time_limit_s = time_limit_s
        self.temperature = temperature if do_sample else 0.0
        self.adapter_cache_size = max(1, adapter_cache_size)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kbloop-vllm")
        self._lock = threading.Lock()
        self._waiting: set[int] = set()  # ids of requests submitted and not started
        self._requests: dict[int, GenerationRequest] = {}
        self._loaded: OrderedDict[str, int] = OrderedDict()  # version -> answers in flight with it, LRU order
        self._closed = False

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._loaded)

    def start(self) -> None:
        pass  # threads start with the first request

    def submit(self, request: GenerationRequest) -> Future:
        with self._lock:
            if self._closed:
                raise BackendClosed("the generation backend is closed")
            self._waiting.add(id(request))
            self._requests[id(request)] = request
        self._pool.submit(self._run, request)
        return request.future

    def close(self, timeout: float) -> list[GenerationRequest]:
        with self._lock:
            self._closed = True
            left = [self._requests.pop(key) for key in list(self._waiting)]
            self._waiting.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        return left

    # --- one request ----------------------------------------------------------------------------------

    def _run(self, request: GenerationRequest) -> None:
        with self._lock:
            if self._closed or id(request) not in self._waiting:
                return  # close() handed it back to the engine
            self._waiting.discard(id(request))
            self._requests.pop(id(request), None)
        try:
            request.future.set_result(self._generate(request))
        except BaseException as exc:  # noqa: BLE001 - the caller gets it
            if not request.future.done():
                request.future.set_exception(exc)

    def _generate(self, request: GenerationRequest) -> Generated:
        version, notices = self._use(self.resolve(request.adapter))
        try:
            prompt, trimmed = request.prompt(version)
            stream = TextStream("".join, request.on_text) if request.on_text is not None else None
            pieces: list[str] = []

            def grown(piece: str) -> None:
                pieces.append(piece)
                if stream is not None:
                    stream.update(pieces)

            model = version or self.client.target.model
            deadline = time.monotonic() + self.time_limit_s
            complete = functools.partial(self.client.complete, prompt, max_tokens=self.max_new_tokens,
                                         stop_ids=self.stop_ids, temperature=self.temperature, deadline=deadline,
                                         on_text=grown)
            try:
                completion = complete(model=model)
            except VllmError as exc:
                if version is None or "does not exist" not in str(exc) or pieces:
                    raise
                # vLLM restarted since it was loaded: load it again (its use count stays), ask once more
                self.client.load_adapter(version, Path(self.adapter_folder(version)))
                completion = complete(model=model)
            text = clean_answer(completion.text)
            if stream is not None:
                stream.finish(text)
            return Generated(text, version, notices + ((trimmed,) if trimmed else ()))
        finally:
            self._release(version)

    # --- adapters in vLLM -----------------------------------------------------------------------------

    def _use(self, version: str | None) -> tuple[str | None, tuple[str, ...]]:
        """(the version that answers, notices): `version` loaded into vLLM and counted in use, or the base."""
        if version is None:
            return None, ()
        try:
            folder = self.adapter_folder(version)
            if not (Path(folder) / "adapter_config.json").exists():
                return None, (f"adapter {version} is a full fine-tune, which vLLM cannot load as a LoRA adapter; "
                              "answered with the base model",)
            with self._lock:
                loaded = version in self._loaded
                self._loaded[version] = self._loaded.get(version, 0) + 1
                self._loaded.move_to_end(version)
            if not loaded:
                try:
                    self.client.load_adapter(version, Path(folder))
                except BaseException:
                    self._forget(version)
                    raise
                log.info("engine: adapter %s loaded into vLLM", version)
        except VllmError:
            raise  # vLLM is down or refused: the engine reports it as unavailable
        except Exception as exc:  # noqa: BLE001 - an unknown or unreadable version: the base answers
            return None, (f"adapter {version} could not be loaded ({type(exc).__name__}: {exc}); "
                          "answered with the base model",)
        self._evict()
        return version, ()

    def _release(self, version: str | None) -> None:
        if version is None:
            return
        with self._lock:
            if version in self._loaded:
                self._loaded[version] -= 1
        self._evict()

    def _forget(self, version: str) -> None:
        with self._lock:
            self._loaded.pop(version, None)

    def _evict(self) -> None:
        """Unload the least recently used versions beyond the cache size that no answer is using."""
        with self._lock:
            idle = [v for v, in_use in self._loaded.items() if in_use == 0]
            surplus = len(self._loaded) - self.adapter_cache_size
            retired = idle[:max(0, surplus)]
            for version in retired:
                del self._loaded[version]
        for version in retired:
            try:
                self.client.unload_adapter(version)
                log.info("engine: adapter %s unloaded from vLLM", version)
            except VllmError as exc:  # it stays loaded there: harmless
                log.warning("engine: %s", exc)
