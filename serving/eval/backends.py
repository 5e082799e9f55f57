"""Where the evaluation's requests go: the offline engine (`LLM`) or any OpenAI-compatible server.

Either way a configuration is a request body (any fields of the chat or completions endpoint,
extensions included), so one configuration measures this engine offline, this server, or another.
A query is a question, its documents (or none), and whether it is sent as chat.
"""

from dataclasses import dataclass

QA_FORMAT = "Question: {question}\nAnswer:"  # how a question is put to a model without a chat template
CHUNK = 64  # prompts per offline batch: the progress bar moves between batches


@dataclass(frozen=True)
class Query:
    text: str
    documents: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int


class OfflineBackend:
    """The engine in this process. `models`: (served name, directory) pairs; the first is the model."""

    def __init__(self, models: list[tuple[str, str]], chat: bool | None = None, **engine_args):
        from counterpoint.serving.llm import LLM

        (self.model, path), extra = models[0], tuple(models[1:])
        self.llm = LLM(path, extra_models=extra, show_progress=False, **engine_args)
        self.chat = self.llm.get_tokenizer().chat_template is not None if chat is None else chat

    def run(self, queries: list[Query], body: dict, bar) -> list[Completion]:
        out = []
        for start in range(0, len(queries), CHUNK):
            chunk = queries[start : start + CHUNK]
            params = self._params(body, chunk[0])
            documents = [list(q.documents) for q in chunk] if chunk[0].documents else None
            if self.chat:
                conversations = [[{"role": "user", "content": q.text}] for q in chunk]
                results = self.llm.chat(conversations, params, documents=documents, use_tqdm=False)
            else:
                prompts = [QA_FORMAT.format(question=q.text) for q in chunk]
                results = self.llm.generate(prompts, params, documents=documents, use_tqdm=False)
            out += [Completion(r.outputs[0].text, len(r.outputs[0].token_ids)) for r in results]
            bar.update(len(chunk))
        return out

    def _params(self, body: dict, query: Query):
        """The body read exactly as the server reads it (defaults and checks included)."""
        from counterpoint.serving.api.protocol import ChatCompletionRequest, CompletionRequest

        fields = {"model": self.model, **body, "documents": list(query.documents) or None}
        if self.chat:
            request = ChatCompletionRequest(messages=[{"role": "user", "content": query.text}], **fields)
        else:
            request = CompletionRequest(prompt=query.text, **fields)
        return request.to_sampling_params()


class HttpBackend:
    """An OpenAI-compatible server through the official client, `concurrency` requests in flight."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None, concurrency: int, chat: bool = True):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=600, max_retries=0)
        self.model = model or self.client.models.list().data[0].id
        self.concurrency, self.chat = concurrency, chat

    def run(self, queries: list[Query], body: dict, bar) -> list[Completion]:
        from concurrent.futures import ThreadPoolExecutor

        def one(query: Query) -> Completion:
            result = self._send(query, body)
            bar.update(1)
            return result

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, queries))

    def _send(self, query: Query, body: dict) -> Completion:
        # NOTE: every field goes through extra_body, so any server extension passes unchanged.
        extra = {**body, **({"documents": list(query.documents)} if query.documents else {})}
        if self.chat:
            resp = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": query.text}], extra_body=extra)
            text = resp.choices[0].message.content or ""
        else:
            resp = self.client.completions.create(model=self.model, prompt=QA_FORMAT.format(question=query.text),
                                                  extra_body=extra)
            text = resp.choices[0].text
        return Completion(text, resp.usage.completion_tokens if resp.usage else 0)
