"""A stand-in vLLM server: a real HTTP server on loopback that answers like vLLM's OpenAI-compatible server
started with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, generating with transformers + PEFT.

    with FakeVllm(base_path, served_name="tiny") as vllm:
        ... KBLOOP_VLLM_URL=vllm.url ...
        assert vllm.loaded == {"v0001": "/path/as/vllm/saw/it"}

The endpoints and payload shapes follow vLLM's docs (docs.vllm.ai, "LoRA Adapters" and "OpenAI-Compatible
Server"): GET /health; GET /v1/models (the base, then each adapter with `parent` set to the base);
POST /v1/load_lora_adapter {"lora_name", "lora_path"} answering plain text, 400 when already loaded;
POST /v1/unload_lora_adapter {"lora_name"}, 404 when unknown; POST /v1/completions with `prompt` as a list of
token ids, greedy at temperature 0, `stop_token_ids`, `stream` as server-sent events ending in `data: [DONE]`;
errors as {"object": "error", "message", "type", "code"}; an unknown `model` is a 404.
`requests` records each request (path and JSON body); `fail_completions(n)` answers the next n completions
with a 500.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeVllm:
    def __init__(self, base_path: str | Path, *, served_name: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.served_name = served_name
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32).eval()
        self.loaded: dict[str, str] = {}  # lora_name -> lora_path as given
        self.requests: list[tuple[str, dict]] = []
        self._failures = 0
        self._lock = threading.Lock()  # one generation at a time (vLLM batches; a stand-in need not)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeVllm:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail_completions(self, n: int = 1) -> None:
        self._failures = n

    def models_asked(self) -> list[str]:
        return [body["model"] for path, body in self.requests if path == "/v1/completions"]

    # --- what vLLM does -------------------------------------------------------------------------------

    def _load(self, name: str, path: str) -> tuple[int, str]:
        from peft import PeftModel

        if name in self.loaded:
            return 400, json.dumps(_error(f"The lora adapter '{name}' has already been loaded.", 400))
        if not (Path(path) / "adapter_config.json").exists():
            return 400, json.dumps(_error(f"No adapter found for {path}", 400))
        with self._lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
            self.model.eval()
        self.loaded[name] = path
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def _unload(self, name: str) -> tuple[int, str]:
        if name not in self.loaded:
            return 404, json.dumps(_error(f"The lora adapter '{name}' cannot be found.", 404))
        with self._lock:
            self.model.delete_adapter(name)
        del self.loaded[name]
        return 200, f"Success: LoRA adapter '{name}' removed successfully."

    def _generate(self, body: dict) -> tuple[list[int], str]:
        import contextlib

        import torch

        model_name = body["model"]
        ids = body["prompt"]
        stop = list(body.get("stop_token_ids") or []) + [self.tokenizer.eos_token_id]
        with self._lock, torch.inference_mode():
            if model_name == self.served_name:
                scope = self.model.disable_adapter() if self.loaded else contextlib.nullcontext()
            else:
                self.model.set_adapter(model_name)
                scope = contextlib.nullcontext()
            with scope:
                out = self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                          dtype=torch.long), max_new_tokens=int(body.get("max_tokens", 16)),
                                          do_sample=False, eos_token_id=stop,
                                          pad_token_id=self.tokenizer.pad_token_id or stop[0])
        new = out[0, len(ids):].tolist()
        if new and new[-1] in stop:
            return new[:-1], "stop"
        return new, "length"

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, text: str, content_type: str = "application/json") -> None:
                data = text.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    return self._send(200, "", "text/plain")
                if self.path == "/v1/models":
                    data = [{"id": fake.served_name, "object": "model", "root": fake.served_name, "parent": None}]
                    data += [{"id": name, "object": "model", "root": path, "parent": fake.served_name}
                             for name, path in fake.loaded.items()]
                    return self._send(200, json.dumps({"object": "list", "data": data}))
                self._send(404, json.dumps(_error("Not Found", 404)))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                fake.requests.append((self.path, body))
                if self.path == "/v1/load_lora_adapter":
                    return self._send(*fake._load(body["lora_name"], body["lora_path"]), "text/plain")
                if self.path == "/v1/unload_lora_adapter":
                    return self._send(*fake._unload(body["lora_name"]), "text/plain")
                if self.path != "/v1/completions":
                    return self._send(404, json.dumps(_error("Not Found", 404)))
                if fake._failures:
                    fake._failures -= 1
                    return self._send(500, json.dumps(_error("EngineCore encountered an issue.", 500)))
                if body.get("model") not in {fake.served_name, *fake.loaded}:
                    return self._send(404, json.dumps(_error(f"The model `{body.get('model')}` does not exist.",
                                                             404)))
                new, finish = fake._generate(body)
                if not body.get("stream"):
                    text = fake.tokenizer.decode(new, skip_special_tokens=True)
                    return self._send(200, json.dumps({"object": "text_completion", "model": body["model"],
                                                       "choices": [{"index": 0, "text": text,
                                                                    "finish_reason": finish}]}))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                sent = ""
                for i in range(len(new)):  # one event per token; text that is not whole yet waits
                    text = fake.tokenizer.decode(new[:i + 1], skip_special_tokens=True)
                    if text.endswith("\ufffd"):
                        continue
                    self._event(text[len(sent):], None, body["model"])
                    sent = text
                self._event("", finish, body["model"])
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

            def _event(self, text: str, finish: str | None, model: str) -> None:
                chunk = {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": model,
                         "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                      "stop_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode("utf-8"))
                self.wfile.flush()

        return Handler


def _error(message: str, code: int) -> dict:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(code, "InternalServerError")
    return {"object": "error", "message": message, "type": kind, "param": None, "code": code}
