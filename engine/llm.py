"""LLM: the importable engine. Starts one worker process per pipeline stage (`python -m
engine.runtime.worker`, NCCL on CUDA, gloo on CPU), keeps them for repeated calls, and ends them on close()
or when one dies, through one EngineClient (engine/client.py). Requests are submitted one by one
(thread-safe); the client's router thread hands rank 0's events here, and each goes to the stream of
its request."""
from __future__ import annotations

import itertools
import queue
import sys
import threading
import weakref
from pathlib import Path
from typing import Callable, Iterator, Sequence as Seq

from loader.model_files import load_tokenizer

from .client import EngineClient, EngineClosed
from .options import EngineOptions, options_from_kwargs
from .outputs import OutputBuilder
from .params import RequestOutput, SamplingParams
from .request_checks import check_params, encode_prompt, prompt_list
from .request_stream import _ABORTED, POLL_S, RequestStream, StopChecker, TokenEvent, _Entry
from .runtime.launch import resolve_engine
from .runtime.scheduler import cache_salts
from .structured.requests import GrammarPayload, GrammarRequests, starts_in_reasoning

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str, options: EngineOptions | None = None, **kwargs):
        self.client: EngineClient | None = None
        if options is not None and kwargs:
            raise TypeError("give either options=EngineOptions(...) or keyword options, not both")
        opts = options.validate() if options is not None else options_from_kwargs(**kwargs)
        self.args, self.config, folder = resolve_engine(model, opts)
        self.options = self.args.options
        self.tokenizer = load_tokenizer(folder) if folder is not None else None
        self.folder = folder
        self._chat_template = None
        self.stop_ids = self.args.stop_ids
        self.grammars = GrammarRequests(folder, self.config.vocab_size, self.stop_ids, self.tokenizer)
        self._lock = threading.RLock()
        self._entries: dict[int, _Entry] = {}
        self._by_request: dict[str, int] = {}  # running or waiting requests
        self._streams: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # request id -> its stream
        self._seq_ids = itertools.count()
        self._auto_ids = itertools.count()
        self.auto_split: dict | None = None  # layers='auto': the measured split and its report
        self._connect()
        if opts.layers == "auto":
            self._auto_split(model, opts)

    def _connect(self) -> None:
        """Start the stages of self.args (the client holds this LLM only weakly through its callbacks)."""
        me = weakref.ref(self)
        self.client = EngineClient(self.args, lambda msg: (llm := me()) is not None and llm._handle(msg),
                                   lambda err: (llm := me()) is not None and llm._broadcast(err))
        info = self.client.info
        self.info, self.stage_info, self.max_model_len = info, self.client.stage_info, info["max_model_len"]

    # ---- messages from the router thread -----------------------------------------------------
    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "events":
            for sid, tok, reason, extra in msg[1]:
                with self._lock:
                    entry = self._entries.get(sid)
                    if entry is not None and reason is not None:
                        self._forget(sid)
                if entry is not None:
                    entry.deliver(self._event(sid, entry, tok, reason, extra))
        elif kind == "refused":
            with self._lock:
                entry = self._entries.get(msg[1])
                self._forget(msg[1])
            if entry is not None:
                entry.deliver(ValueError(msg[2]))

    def _event(self, sid: int, entry: _Entry, tok: int, reason: str | None, extra: dict | None) -> TokenEvent:
        """The TokenEvent of a token; a stop string it completes ends the sequence in the engine too."""
        ev = entry.event(tok, reason, extra)
        if ev.finish_reason is not None and reason is None:
            with self._lock:
                self._forget(sid)
            self.client.send_if_running(("abort", [sid]))
        return ev

    def _forget(self, sid: int) -> None:
        entry = self._entries.pop(sid, None)
        if entry is not None:
            self._by_request.pop(entry.request_id, None)

    def _broadcast(self, err: BaseException) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
            self._by_request = {}
        for e in entries:
            e.deliver(err)

    @property
    def dead_error(self) -> BaseException | None:
        """The StageDied that ended the engine (a stage failed), or None (vLLM's name)."""
        return self.client.dead if self.client is not None else None

    @property
    def is_closed(self) -> bool:
        """close() was called (or the stages never started)."""
        return self.client is None or self.client.closed

    def _check_usable(self) -> None:
        if self.client is None:
            raise EngineClosed("the engine is closed")
        self.client.check_usable()

    def close(self) -> None:
        """End the stage processes; requests still running end with EngineClosed."""
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- requests ----------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(prompt, self.tokenizer, self.config.vocab_size)

    def _check(self, ids: list[int], params: SamplingParams, reasoning: bool = False) -> GrammarPayload | None:
        check_params(ids, params, self.max_model_len, self.info, self.config.vocab_size, self.tokenizer)
        return self.grammars.payload(params.structured_outputs, reasoning)

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
               on_event: Callable | None = None, cache_salt: str | None = None, reasoning: bool = False
               ) -> RequestStream:
        """Queue one request; returns its stream. With on_event, every TokenEvent (and a final
        exception if the engine dies) goes to on_event(event) on the router thread instead.
        cache_salt: only requests of the same salt share prefix-cache blocks. reasoning: the output
        starts in the model's reasoning (thinking on): structured_outputs apply after `</think>`."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.n > 1:
            raise ValueError("SamplingParams: n > 1 streams one request per sample: submit each of "
                             "params.samples(), or use generate()")
        salt = cache_salts(cache_salt, 1)[0]
        ids = self._encode(prompt)
        grammar = self._check(ids, params, reasoning)
        return self._submit([(ids, params, request_id, on_event, salt, grammar)])[0]

    def _submit(self, reqs: list) -> list[RequestStream]:
        self._check_usable()
        streams, adds = [], []
        with self._lock:
            for _, _, rid, *_ in reqs:
                if rid is not None and rid in self._by_request:
                    raise ValueError(f"request_id {rid!r} is already running")
            for ids, params, rid, on_event, salt, grammar in reqs:
                rid = rid if rid is not None else f"req-{next(self._auto_ids)}"
                sid = next(self._seq_ids)
                s = RequestStream(rid, sid, self._abort_callback(sid))
                self._entries[sid] = _Entry(rid, on_event if on_event is not None else s.feed, on_event is None,
                                            weakref.ref(s), StopChecker.of(params, self.tokenizer))
                self._by_request[rid] = sid
                self._streams[rid] = s
                streams.append(s)
                adds.append((sid, ids, params, salt, grammar))
            self.client.send(("add", adds))
        return streams

    def abort(self, request_ids: str | Seq[str]) -> None:
        """Abort running or waiting requests by id: they stop and free their blocks, and their
        streams end (a request that already finished only has its stream ended); unknown ids are
        ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        with self._lock:
            sids = [self._by_request[r] for r in request_ids if r in self._by_request]
            done = [self._streams.get(r) for r in request_ids if r not in self._by_request]
        for stream in done:  # finished in the engine, tokens still queued: the stream ends here too
            if stream is not None:
                stream.finished = True
        self._abort_seqs(sids)

    def _abort_seqs(self, sids: list[int]) -> None:
        with self._lock:
            entries = [(s, self._entries[s]) for s in sids if s in self._entries]
            sids = [s for s, _ in entries]
            for s in sids:
                self._forget(s)
        for _, e in entries:
            stream = e.stream()
            if stream is not None:
                stream.finished = True  # tokens already queued are not yielded
            if e.own_queue:
                e.deliver(_ABORTED)  # wakes an iterator blocked on the queue
        if sids:
            self.client.send_if_running(("abort", sids))

    def _abort_callback(self, sid: int) -> Callable[[], None]:
        """A stream's abort: ends sequence sid here and in the engine (holds this LLM weakly)."""
        me = weakref.ref(self)
        return lambda: (llm := me()) is not None and llm._abort_seqs([sid])

    def _prepare(self, prompts, params, cache_salt=None, reasoning: Seq[bool] = ()) -> tuple[list, list, list, list]:
        """Prompt ids, params, cache salts and grammar payloads, one per prompt (n not expanded), checked."""
        prompts, plist = prompt_list(prompts, params)
        salts = cache_salts(cache_salt, len(prompts))
        ids, grammars = [self._encode(p) for p in prompts], []
        for i, (x, sp) in enumerate(zip(ids, plist)):
            try:
                grammars.append(self._check(x, sp, bool(reasoning and reasoning[i])))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        return ids, plist, salts, grammars

    def stream(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
               cache_salt: str | Seq[str | None] | None = None) -> Iterator[tuple[int, int, str | None]]:
        """Yield (prompt index, new token id, finish reason or None) as tokens arrive. Leaving the
        loop early (break, close(), garbage collection) aborts the call's unfinished requests.
        cache_salt: one for every prompt or one per prompt (submit)."""
        ids, plist, salts, grammars = self._prepare(prompts, params, cache_salt)
        if any(p.n > 1 for p in plist):
            raise ValueError("SamplingParams: n > 1 is for generate(); stream() yields one sequence per prompt")
        self._check_usable()
        return ((i, ev.token_id, ev.finish_reason) for i, ev in self._stream(ids, plist, salts, grammars, []))

    def _stream(self, ids, plist, salts, grammars, streams_out: list) -> Iterator[tuple[int, TokenEvent]]:
        events: queue.Queue = queue.Queue()
        streams = self._submit([(x, sp, None, (lambda ev, i=i: events.put((i, ev))), salt, g)
                                for i, (x, sp, salt, g) in enumerate(zip(ids, plist, salts, grammars))])
        streams_out.extend(streams)
        remaining = len(streams)
        try:
            while remaining:
                try:
                    i, ev = events.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if isinstance(ev, BaseException):
                    raise ev if not isinstance(ev, ValueError) else ValueError(f"prompt {i}: {ev}")
                if ev.finish_reason is not None:
                    streams[i].finished = True
                    remaining -= 1
                yield i, ev
        finally:
            self._abort_seqs([s.seq_id for s in streams if not s.finished])
            for s in streams:
                s.finished = True

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 cache_salt: str | Seq[str | None] | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, its `outputs` the params' n samples (each its own sequence,
        sharing the prompt's cached blocks)."""
        return self._generate(prompts, params, cache_salt)

    def _generate(self, prompts, params, cache_salt=None, reasoning: Seq[bool] = ()) -> list[RequestOutput]:
        ids, plist, salts, grammars = self._prepare(prompts, params, cache_salt, reasoning)
        self._check_usable()
        seqs = [(i, j, x, sp, salt, g) for i, (x, p, salt, g) in enumerate(zip(ids, plist, salts, grammars))
                for j, sp in enumerate(p.samples())]
        streams: list[RequestStream] = []
        gen = self._stream(*zip(*[q[2:] for q in seqs]), streams)
        builders = [OutputBuilder("", x, p.n, p.logprobs is not None) for x, p in zip(ids, plist)]
        try:
            for k, ev in gen:
                builders[seqs[k][0]].add(seqs[k][1], ev)
        finally:
            gen.close()
        for (i, j, *_), s in zip(seqs, streams):
            if j == 0:
                builders[i].request_id = s.request_id
        return [b.build(self.tokenizer) for b in builders]

    def chat(self, messages: list[dict] | Seq[list[dict]], params: SamplingParams | Seq[SamplingParams] | None = None,
             chat_template_kwargs: dict | None = None, add_generation_prompt: bool = True,
             tools: list[dict] | None = None, cache_salt: str | Seq[str | None] | None = None
             ) -> list[RequestOutput]:
        """generate() over conversations rendered with the checkpoint's chat template, as transformers'
        apply_chat_template renders them (chat_template_kwargs, e.g. {"enable_thinking": False},
        reach the template). One conversation or a list of them; one output each (thinking on:
        structured_outputs apply after `</think>`)."""
        from .tools.chat_template import ChatTemplate, ChatTemplateError
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_folder(self.folder)
            if self._chat_template is None:
                raise ChatTemplateError(f"{self.folder}: the checkpoint has no chat template")
        convs = list(messages) if messages and isinstance(messages[0], (list, tuple)) else [messages]
        texts = [self._chat_template.render(c, add_generation_prompt, tools, chat_template_kwargs=chat_template_kwargs)
                 for c in convs]
        source = self._chat_template.pick(tools)
        return self._generate(texts, params, cache_salt, [starts_in_reasoning(source, t, chat_template_kwargs)
                                                          for t in texts])

    # ---- stats -------------------------------------------------------------------------------
    def stats(self, reset: bool = False, per_step: bool = False, profile: dict | None = None) -> dict:
        """{"stages": [per stage: rank, layers, busy_ms, steps, tokens, peak_gib, kv_gib, ...],
        "scheduler": {running, waiting, free_blocks, num_blocks, preemptions, prompt_tokens,
        generation_tokens, prefix_cache_queries, prefix_cache_hits, ...}}: a snapshot taken behind the
        micro-batches already in flight, without draining them. per_step adds the (bounded) per-step
        lists. profile: a command for the stages' profilers (engine/runtime/trace.py StageProfiler), carried
        by this request."""
        self._check_usable()
        return self.client.call("stats", bool(reset), bool(per_step), profile)

    def reset_prefix_cache(self) -> bool:
        """Drop every prefix-cache block that no running request holds. True when nothing stays
        cached; False when blocks of running requests keep their place (as vLLM's)."""
        self._check_usable()
        return self.client.call("reset_prefix_cache")

    def start_profile(self) -> None:
        """Record a timeline on every stage from here on (behind the work already in flight)."""
        from .runtime.trace import start_profile
        start_profile(self)

    def stop_profile(self, path: str | Path | None = None) -> dict:
        """Stop recording and write a Chrome trace-event file to `path` (ui.perfetto.dev,
        chrome://tracing). Returns {"path", "bubble": {stage: idle fraction}, "stages": stats}."""
        from .runtime.trace import stop_profile
        return stop_profile(self, path)

    def _auto_split(self, model: str, opts: EngineOptions) -> None:
        """layers='auto': measure on the even split, restart on the balanced split if it differs."""
        from .tools.auto_split import auto_layers
        counts, report = auto_layers(self)
        if self.options.verbose:
            print(f"[moepipe] auto split: {report['summary']}", file=sys.stderr, flush=True)
        if counts != report["before"]:
            self.client.close(join=True)
            self.args = resolve_engine(model, opts.with_(layers=counts))[0]
            self.options = self.args.options
            self._connect()
        self.auto_split = report

