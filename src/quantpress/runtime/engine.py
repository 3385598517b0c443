"""Continuous-batching generation: the one decode loop. One scheduler thread serves every request.

Every generation path runs here: the server's routes submit to one long-lived engine,
`quantpress.generate` runs its request on an engine of its own (`with Engine(loaded) as engine`),
and the terminal chat keeps one engine for the conversation. So sampling, stop strings and token
texts are the same wherever a request comes from.

Each iteration of the scheduler
1. retires cancelled requests and admits waiting ones (FIFO) while fewer than `max_batch_size` run;
2. runs the next token of every decoding sequence plus the next prompt chunk (<= PREFILL_CHUNK
   tokens, FIFO, up to MAX_STEP_ROWS rows in all) of sequences still being prefilled, as ONE
   packed forward (`ragged_forward`; each sequence keeps its own KV cache);
3. samples each sequence that needs a token with its own seeded `torch.Generator`, emits the
   events, and retires finished sequences, freeing their KV caches.
Requests join and leave between steps; nobody waits for a batch to drain, and a long prompt is
prefilled a chunk per step while the others keep decoding.

Batch invariance (`batch_invariant=True`): a request's logits are then bitwise the same alone and
under any load. Attention is per sequence, prompts are cut into chunks at fixed offsets, every
request samples from its own generator, and the step is split so that no GEMM's shape depends on
the load: decode rows in forwards of exactly 16 rows, each prompt chunk in a forward of its own
(see ragged.BATCH_INVARIANT_ROWS). The price: a lone sequence decodes 16 padded rows (the bundled
model: ~1.6x slower per token; a 300M-parameter model on 2 cores: ~2.7x), prompts are not packed
together, and more than 16 running sequences take several decode forwards. Without it (the
default, like TGI and vLLM), logits move by ~1e-6 with the batch composition.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from quantpress.errors import CheckpointError, ConfigError, GenerationFailed, Overloaded, PromptTooLong
from quantpress.runtime.detokenize import IncrementalDetokenizer, StopFilter
from quantpress.runtime.loader import LoadedModel
from quantpress.runtime.ragged import (
    BATCH_INVARIANT_ROWS,
    SequenceKV,
    install_ragged_attention,
    ragged_forward,
)
from quantpress.runtime.sampling import SamplingParams, sample_next
from quantpress.runtime.stream import Stream, TokenEvent

__all__ = ["Engine", "EngineStats", "SamplingParams", "Stream", "TokenEvent", "check_length", "eos_ids"]

SHUTTING_DOWN = "server shutting down"
PREFILL_CHUNK = 128  # prompt tokens per sequence per step
MAX_STEP_ROWS = 256  # tokens per step: bounds the step time the decoding sequences wait for
MAX_BATCH_SIZE = MAX_STEP_ROWS - PREFILL_CHUNK  # so one prompt chunk always fits beside the decode rows


def eos_ids(loaded: LoadedModel) -> set[int]:
    """The ids that end generation: generation_config's EOS id(s) and the tokenizer's."""
    ids = loaded.model.generation_config.eos_token_id if loaded.model.generation_config else None
    ids = list(ids) if isinstance(ids, list) else [ids]
    if loaded.tokenizer is not None and loaded.tokenizer.eos_token_id is not None:
        ids.append(loaded.tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def check_length(loaded: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = loaded.max_length
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise PromptTooLong(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"limit of {limit} tokens; shorten the prompt or lower max_new_tokens"
        )


@dataclass(frozen=True)
class EngineStats:
    queue_size: int  # requests waiting for a batch slot
    batch_size: int  # sequences running
    requests_total: int  # requests accepted since the engine was made
    tokens_generated_total: int
    kv_cache_bytes: int = 0  # held by the running sequences after the last step


class _Sequence:
    """The scheduler's state of one request."""

    def __init__(self, prompt: list[int], params: SamplingParams, stream: Stream, tokenizer) -> None:
        self.prompt = prompt
        self.params = params
        self.stream = stream
        self.generated: list[int] = []
        self.text: list[str] = []  # emitted texts of non-special tokens
        self.kv = SequenceKV(len(prompt) + params.max_new_tokens)
        self.generator = torch.Generator().manual_seed(stream.seed)
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        self.stops = StopFilter(params.stop)  # only its `stopped` is read: the text keeps the stop string

    def seen(self) -> Tensor:
        return torch.tensor(self.prompt + self.generated)

    def next_tokens(self) -> list[int]:
        """What the next forward feeds for this sequence: its last generated token, or the next
        prompt chunk (cut at multiples of PREFILL_CHUNK, so the chunks never depend on load)."""
        if self.generated:
            return self.generated[-1:]
        start = self.kv.length
        return self.prompt[start:min(len(self.prompt), (start // PREFILL_CHUNK + 1) * PREFILL_CHUNK)]

    @property
    def wants_token(self) -> bool:
        """Everything known is in the cache: the last forward's logits give the next token."""
        return self.kv.length == len(self.prompt) + len(self.generated)


class Engine:
    """Serves generation requests with continuous batching on one background thread."""

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 16, max_concurrent_requests: int = 128,
                 batch_invariant: bool = False, inline: bool = False) -> None:
        """`inline`: no scheduler thread; whoever iterates a stream runs the scheduler steps, on
        its own thread (generate, the terminal chat). Why it matters: OpenMP (torch's intra-op
        pool) is fast only for the one thread that owns a pool of spinning workers. A second
        thread running parallel regions puts libgomp over the core count, it stops spinning, and
        every region pays a wake-up: on 2 cores a SmolLM2 decode step took 58 ms on the scheduler
        thread after the main thread had loaded the model, 27 ms on the main thread. The server
        keeps the thread and loads its model on a thread that exits (server.app.serve)."""
        if not 1 <= max_batch_size <= MAX_BATCH_SIZE:
            raise ConfigError(f"max_batch_size must be in [1, {MAX_BATCH_SIZE}], got {max_batch_size}")
        if max_concurrent_requests < 1:
            raise ConfigError(f"max_concurrent_requests must be at least 1, got {max_concurrent_requests}")
        if loaded.tokenizer is None:
            raise CheckpointError(f"{loaded.path} has no tokenizer files; the engine streams text")
        self._loaded = loaded
        self._tokenizer = loaded.tokenizer
        self._max_batch_size = max_batch_size
        self._max_concurrent = max_concurrent_requests
        self._batch_invariant = batch_invariant
        self._vocab = loaded.model.get_input_embeddings().num_embeddings
        self._eos = frozenset(eos_ids(loaded))
        self._special = frozenset(self._tokenizer.all_special_ids) | self._eos
        install_ragged_attention(loaded.model)

        self._lock = threading.Lock()  # guards everything below; never held during a forward
        self._wake = threading.Condition(self._lock)
        self._model_lock = threading.Lock()  # held during every forward (scheduler or prompt_logprobs)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._active = 0  # waiting + running and not yet retired: what max_concurrent_requests bounds
        self._requests_total = 0
        self._tokens_total = 0
        self._kv_bytes = 0
        self._closed = False
        self._inline = inline
        self._thread: threading.Thread | None = None

    # -- public interface -------------------------------------------------------------------
    def __enter__(self) -> Engine:
        """`with Engine(loaded) as engine:` runs the scheduler for the block (one-request users)."""
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the scheduler thread (a daemon); idempotent."""
        with self._lock:
            if self._closed:
                raise GenerationFailed(SHUTTING_DOWN)
            if self._thread is None and not self._inline:
                self._thread = threading.Thread(target=self._run, name="quantpress-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the scheduler after its current step; unfinished streams fail with "server shutting down"."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            leftovers = list(self._waiting) + self._running
            self._waiting.clear()
            self._running.clear()
            self._active = 0
            self._kv_bytes = 0
        for seq in leftovers:
            seq.kv.release()
            seq.stream.fail(SHUTTING_DOWN)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Stream:
        """Queue a request. Raises Overloaded when max_concurrent_requests are waiting or running,
        PromptTooLong when the prompt plus max_new_tokens exceed the model's context."""
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ConfigError("prompt_ids is empty: generation needs at least one prompt token")
        if not all(0 <= i < self._vocab for i in prompt):
            raise ConfigError(f"prompt_ids must be in [0, {self._vocab}), the model's vocabulary")
        check_length(self._loaded, len(prompt), params.max_new_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        stream = Stream(seed, len(prompt), on_cancel=self._poke, pump=self._iterate if self._inline else None)
        seq = _Sequence(prompt, params, stream, self._tokenizer)
        with self._wake:
            if self._closed:
                raise GenerationFailed(SHUTTING_DOWN)
            if self._active >= self._max_concurrent:
                raise Overloaded(f"{self._active} requests are already waiting or running "
                                 f"(max_concurrent_requests={self._max_concurrent}); retry later")
            self._waiting.append(seq)
            self._active += 1
            self._requests_total += 1
            self._wake.notify()
        return stream

    @torch.inference_mode()
    def prompt_logprobs(self, prompt_ids: list[int]) -> list[float | None]:
        """log p(token_i | tokens before it) for each prompt token; None for the first.

        One plain forward under the model lock (it waits for at most one scheduler step): call it
        from a worker thread, not from an event loop.
        """
        ids = torch.tensor([int(i) for i in prompt_ids], dtype=torch.long)
        if ids.numel() == 0:
            return []
        check_length(self._loaded, ids.numel(), 0)
        with self._model_lock:
            logits = self._loaded.model(input_ids=ids[None]).logits[0, :-1].float()  # [n - 1, vocab]
        logprobs = logits.log_softmax(-1).gather(-1, ids[1:, None])[:, 0]
        return [None, *logprobs.tolist()]

    @property
    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(len(self._waiting), len(self._running), self._requests_total, self._tokens_total,
                               self._kv_bytes)

    # -- the scheduler thread ---------------------------------------------------------------
    def _poke(self) -> None:
        """Wake the scheduler (a stream was cancelled)."""
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                # blocks, using no CPU, until there is work or close() is called
                self._wake.wait_for(lambda: self._closed or self._waiting or self._running)
                if self._closed:
                    return
            self._iterate()

    def _iterate(self) -> None:
        """One scheduler iteration: admit, one step, account. The scheduler thread loops on it;
        an inline engine's streams call it while they wait for their next event."""
        with self._wake:
            if self._closed:
                return
            self._admit_locked()
            running = list(self._running)
        try:
            self._step(running)
        except Exception as exc:  # noqa: BLE001  a bug in bookkeeping: fail what runs, keep serving
            self._fail(running, exc)
        with self._lock:  # read here, on the thread that grows and frees the caches
            self._kv_bytes = sum(s.kv.nbytes for s in self._running)

    def _admit_locked(self) -> None:
        """Retire cancelled requests, then move waiting ones into the batch (FIFO)."""
        for seq in [s for s in self._running if s.stream.cancelled]:
            self._retire_locked(seq)
            seq.stream.end_cancelled()
        for seq in [s for s in self._waiting if s.stream.cancelled]:
            self._waiting.remove(seq)
            self._active -= 1
            seq.stream.end_cancelled()
        while self._waiting and len(self._running) < self._max_batch_size:
            self._running.append(self._waiting.popleft())

    def _plan(self, running: list[_Sequence]) -> list[list[tuple[_Sequence, list[int]]]]:
        """One step's forwards, each a list of (sequence, its new tokens): every decoding
        sequence's next token, then prompt chunks (FIFO) while the step stays within MAX_STEP_ROWS."""
        decode = [(s, s.next_tokens()) for s in running if s.generated]
        prefill = []
        budget = MAX_STEP_ROWS - len(decode)
        for seq in (s for s in running if not s.generated):
            chunk = seq.next_tokens()
            if len(chunk) > budget:
                break  # later prompts wait rather than overtake this one
            prefill.append((seq, chunk))
            budget -= len(chunk)
        if not self._batch_invariant:
            return [decode + prefill] if decode or prefill else []
        rows = BATCH_INVARIANT_ROWS
        return [decode[i:i + rows] for i in range(0, len(decode), rows)] + [[chunk] for chunk in prefill]

    def _step(self, running: list[_Sequence]) -> None:
        for work in self._plan([s for s in running if not s.stream.cancelled]):
            self._forward(work)

    def _forward(self, work: list[tuple[_Sequence, list[int]]]) -> None:
        """One packed forward over `work`, then a token for each sequence whose prompt is all in."""
        seqs = [seq for seq, _ in work]
        # invariant decode groups are padded to exactly 16 rows; a prompt chunk alone needs none
        decoding = self._batch_invariant and bool(seqs[0].generated)
        try:
            with self._model_lock:
                logits = ragged_forward(self._loaded.model, [tokens for _, tokens in work], [seq.kv for seq in seqs],
                                        min_rows=BATCH_INVARIANT_ROWS if decoding else 1)  # [len(work), vocab]
        except Exception as exc:  # noqa: BLE001  any model error ends these streams, not the engine
            self._fail(seqs, exc)
            return
        for seq, row in zip(seqs, logits, strict=True):
            if not seq.wants_token:  # a prompt chunk that is not the last: nothing to sample yet
                continue
            try:
                self._advance(seq, row)
            except Exception as exc:  # noqa: BLE001  e.g. a sampler error: this stream only
                self._fail([seq], exc)

    def _advance(self, seq: _Sequence, logits: Tensor) -> None:
        """Choose `seq`'s next token from its logits [vocab], emit it, retire `seq` if finished."""
        seen = seq.seen() if seq.params.repetition_penalty != 1.0 else torch.empty(0, dtype=torch.long)
        token = sample_next(logits, seen, seq.params, seq.generator)
        logprob = float(logits[token] - logits.logsumexp(-1))
        seq.generated.append(token)
        special = token in self._special
        text = self._tokenizer.decode([token]) if special else seq.detokenizer.push(token)
        finish = self._finish_reason(seq, token, text, special)
        if finish in ("length", "stop_sequence"):
            text += seq.detokenizer.flush()  # characters still held back are emitted with the last token
        if not special:
            seq.text.append(text)
        generated_text = "".join(seq.text) if finish else None
        event = TokenEvent(len(seq.generated), token, text, logprob, special, finish, generated_text)
        with self._lock:
            self._tokens_total += 1
            if finish:  # retire before emitting: a client that saw the end may submit again at once
                self._retire_locked(seq)
        seq.stream.emit(event)

    def _finish_reason(self, seq: _Sequence, token: int, text: str, special: bool) -> str | None:
        # EOS and stop strings before length (as vLLM; TGI checks length first), so a model that
        # ends exactly at the limit still reports that it ended
        if token in self._eos:
            return "eos_token"
        if not special:
            seq.stops.feed(text)
            if seq.stops.stopped:
                return "stop_sequence"
        if len(seq.generated) >= seq.params.max_new_tokens:
            return "length"
        return None

    def _retire_locked(self, seq: _Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self._active -= 1
        seq.kv.release()

    def _fail(self, seqs: list[_Sequence], exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        with self._lock:
            for seq in seqs:
                self._retire_locked(seq)
        for seq in seqs:
            seq.stream.fail(message)
