"""A GGUF model run by llama.cpp (llama-cpp-python's low-level bindings) with explicit positions.

One llama.cpp context holds the KV state of many sequences, each under a sequence id of its own.
A new block that begins with tokens another sequence already holds (a chat template's system
prompt, the earlier turns of a conversation) takes their keys and values from it instead of running
them again (`llama_memory_seq_cp`, which shares the cells), as llama-server's prompt cache does; the
last released sequences are kept for this while their cells are not needed (one that a later
sequence continues, such as a conversation's earlier turn, gives way to it).
`LlamaCppView` offers the calls of the torch `ModelView` (`new_cache`, `forward`, `forward_batch`),
so the `ModelWorker` above it, and everything above that, runs either backend unchanged. A forward
at `start` first drops whatever its sequence holds from `start` on (`llama_memory_seq_rm`): a
rollback is a smaller `start` next time, idempotent as in the torch view.

    model = LlamaCppModel("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", threads=2)
    view = LlamaCppView(model)
    cache = view.new_cache()                              # a sequence id, freed with the cache
    logits = view.forward(prompt_ids, 0, cache, 1)        # [1, V] float32
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specrouter.core.model import KVPool, SeqBlock, check_blocks

_BACKEND = threading.Lock()
_quiet_log = None  # llama.cpp's log callback, kept alive while the process runs


def _init_backend() -> None:
    """llama.cpp's process-wide set-up, once; its log goes quiet (failures still raise here)."""
    global _quiet_log
    import llama_cpp as ll

    with _BACKEND:
        if _quiet_log is None:
            _quiet_log = ll.llama_log_callback(lambda level, text, user_data: None)
            ll.llama_log_set(_quiet_log, ctypes.c_void_p(0))
            ll.llama_backend_init()


class LlamaCppError(RuntimeError):
    pass


DEFAULT_KV_TOKENS = 16384  # positions of a model's KV cache, shared by its sequences (llama-server's --ctx-size)
MIN_SHARED_PREFIX = 16  # the fewest leading tokens worth taking from another sequence's cells (all a block can share: any)
KEPT_RELEASED = 16  # released sequences kept for their prefixes (while their cells and ids are not needed)


class LlamaCppModel:
    """A GGUF file loaded once by llama.cpp, with one context holding up to `max_sequences` sequences
    in a KV cache of `context` positions shared by all of them (`kv_pool`: the generation loop admits
    requests while theirs fit). With `share_prefixes`, a block takes the cells of the leading tokens
    another sequence holds (`share_prefix`): its remaining rows then run in a narrower pass, which may
    round differently, so a request's greedy output can depend on what ran before it (as it can on
    its batch-mates); without, every prompt runs whole and each request's output is its own."""

    def __init__(self, path: str | Path, threads: int | None = None, context: int = DEFAULT_KV_TOKENS, max_sequences: int = 64,
                 batch: int = 512, lora: Path | None = None, share_prefixes: bool = True):
        import llama_cpp as ll

        _init_backend()
        self.path = Path(path)
        self._ll = ll
        model_params = ll.llama_model_default_params()
        # Read, not mapped: the CPU backend repacks Q4_K weights into a layout of its own, and a mapping
        # would keep the file's original pages resident beside the copies (0.6 GB for the 1.5B).
        model_params.load_mode = ll.LLAMA_LOAD_MODE_NONE
        self.model = ll.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {self.path}")
        params = ll.llama_context_default_params()
        threads = threads or len(os.sched_getaffinity(0))
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = context, batch, batch, max_sequences
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # one pool of positions: sequences of any lengths up to `context` in all
        params.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model, params)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise LlamaCppError(f"llama.cpp could not create a context for {self.path}")
        if lora is not None:  # a LoRA adapter (GGUF) on top of the weights; freed with the model
            adapter = ll.llama_adapter_lora_init(self.model, str(lora).encode())
            if not adapter or ll.llama_set_adapters_lora(self.ctx, (ll.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                                         (ctypes.c_float * 1)(1.0)) != 0:
                ll.llama_free(self.ctx)
                ll.llama_model_free(self.model)
                raise LlamaCppError(f"llama.cpp could not apply the LoRA adapter {lora} to {self.path}")
        self.memory = ll.llama_get_memory(self.ctx)
        vocab = ll.llama_model_get_vocab(self.model)
        self.vocab_size = ll.llama_vocab_n_tokens(vocab)
        self.end_ids = frozenset(t for t in (ll.llama_vocab_eos(vocab), ll.llama_vocab_eot(vocab)) if t >= 0)
        self.num_layers = ll.llama_model_n_layer(self.model)
        self.kv_pool = KVPool(ll.llama_n_ctx(self.ctx), max_sequences)
        self.max_positions = min(ll.llama_model_n_ctx_train(self.model), self.kv_pool.positions)
        self.batch_size = batch
        self._batch = ll.llama_batch_init(batch, 0, 1)
        self._free_ids = list(range(max_sequences - 1, -1, -1))
        self.share_prefixes = share_prefixes
        self._held: dict[int, list[int]] = {}  # sequence id -> the tokens its cells hold, by position
        self._kept: OrderedDict[int, None] = OrderedDict()  # released sequences kept for their prefixes, oldest first
        weakref.finalize(self, _free, ll, self.model, self.ctx, self._batch)
        self.exact_width = self._probe_exact_width()

    def _probe_exact_width(self, widest: int = 8, contexts: tuple[int, ...] = (16, 320)) -> int:
        """The widest pass (in tokens of one sequence) whose every row is bit-identical to running its
        tokens one at a time, after a short and a long context. llama.cpp's CPU kernels change with
        the rows a pass holds (repacked Q4_K: a vector product for one row, tiled products from four;
        attention over more than 256 cached positions: split across threads for one query alone), so
        a wider verification pass can round differently from decoding and flip a near-tie. Measured
        once per model, on a probe sequence (Qwen2.5-Coder Q4_K_M: 3 after 16 positions, 1 after 320)."""
        seq = self.take_sequence()
        try:
            return min(self._exact_width_after(seq, min(context, self.max_positions - widest), widest) for context in contexts)
        finally:
            self.drop_sequence(seq, keep=False)

    def _exact_width_after(self, seq: int, context: int, widest: int) -> int:
        tokens = [(7 * i + 3) % self.vocab_size for i in range(context + widest)]
        self.keep_before(seq, 0)
        self.decode([(t, i, seq, False) for i, t in enumerate(tokens[:context])])
        single = np.concatenate([self.decode([(t, context + i, seq, True)]) for i, t in enumerate(tokens[context:])])
        width = 1
        for k in range(2, widest + 1):
            self.keep_before(seq, context)
            if not np.array_equal(self.decode([(t, context + i, seq, True) for i, t in enumerate(tokens[context:context + k])]), single[:k]):
                break
            width = k
        return width

    def take_sequence(self) -> int:
        if not self._free_ids and self._kept:
            self._forget_oldest()
        if not self._free_ids:
            raise LlamaCppError(f"{self.path.name}: all {self._ll.llama_n_seq_max(self.ctx)} sequence slots are in use")
        seq_id = self._free_ids.pop()
        self._held[seq_id] = []
        return seq_id

    def drop_sequence(self, seq_id: int, keep: bool = True) -> None:
        """Give the sequence's id back; with `keep`, its cells stay for later blocks that begin with its
        tokens, until their room or its id is needed."""
        tokens = self._held[seq_id]
        if keep and self.share_prefixes and len(tokens) > 1:
            longer = next((k for k in self._kept if self._held[k][: len(tokens)] == tokens), None)
            if longer is None:  # keep it; kept sequences it now covers (a conversation's earlier turns) go
                for k in [k for k in self._kept if tokens[: len(self._held[k])] == self._held[k]]:
                    self._forget(k)
                self._kept[seq_id] = None
                if len(self._kept) > KEPT_RELEASED:
                    self._forget_oldest()
                return
            self._kept.move_to_end(longer)  # a kept sequence covers it: that one stays, fresher
        self.keep_before(seq_id, 0)
        del self._held[seq_id]
        self._free_ids.append(seq_id)

    def _forget(self, seq_id: int) -> None:
        """A kept sequence's cells and id go after all."""
        del self._kept[seq_id]
        self.drop_sequence(seq_id, keep=False)

    def _forget_oldest(self) -> None:
        self._forget(next(iter(self._kept)))

    def keep_before(self, seq_id: int, position: int) -> None:
        """Drop what the sequence holds at `position` and beyond (a rollback; repeating it is a no-op)."""
        self._ll.llama_memory_seq_rm(self.memory, seq_id, position, -1)
        del self._held[seq_id][position:]

    def share_prefix(self, seq_id: int, token_ids: list[int], start: int, limit: int) -> int:
        """Before running `token_ids` at [start, ...) on a sequence that holds [0, start): take the cells of
        the longest run of them, up to position `limit`, that another sequence holds after the same
        tokens [0, start), if the tokens so held reach position MIN_SHARED_PREFIX or `limit` itself (a
        short prompt asked again: all but the rows that must run). Returns how many of `token_ids` no
        longer need running."""
        held = self._held[seq_id]
        if not self.share_prefixes or limit - start < 1:
            return 0
        wanted = held + token_ids[: limit - start]
        best, source = 0, None
        for other, tokens in self._held.items():
            if other == seq_id or len(tokens) <= max(start, best) or tokens[start] != wanted[start] or tokens[:start] != held:
                continue
            n, end = start + 1, min(len(tokens), len(wanted))
            while n < end and tokens[n] == wanted[n]:
                n += 1
            if n > best:
                best, source = n, other
        if source is None or best < min(MIN_SHARED_PREFIX, limit):  # a source always holds more than [0, start)
            return 0
        self._ll.llama_memory_seq_cp(self.memory, source, seq_id, start, best)
        held += wanted[start:best]
        if source in self._kept:
            self._kept.move_to_end(source)
        return best - start

    def _make_room(self, rows: int) -> None:
        """Forget kept sequences, oldest first, until `rows` more cells fit beside what sequences hold
        (counting shared cells once per sequence: never fewer cells than llama.cpp needs)."""
        while self._kept and sum(map(len, self._held.values())) + rows > self.kv_pool.positions:
            self._forget_oldest()

    def decode(self, rows: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Run (token, position, sequence id, wants logits) rows, in chunks of at most `batch_size`;
        returns the logits of the rows that want them, in order: float32 [n_out, V]."""
        ll, batch, out = self._ll, self._batch, []
        for lo in range(0, len(rows), self.batch_size):
            chunk = rows[lo : lo + self.batch_size]
            for i, (token, pos, seq, logits) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(chunk)
            self._make_room(len(chunk))
            status = ll.llama_decode(self.ctx, batch)
            if status != 0:
                raise LlamaCppError(f"llama_decode failed with status {status} (KV cache full or bad positions)")
            n_out = sum(1 for row in chunk if row[3])
            for token, pos, seq, _ in chunk:
                self._held[seq][pos : pos + 1] = [token]
            if n_out:
                out.append(np.ctypeslib.as_array(ll.llama_get_logits(self.ctx), shape=(n_out, self.vocab_size)).copy())
        return np.concatenate(out) if out else np.empty((0, self.vocab_size), np.float32)


def _free(ll, model, ctx, batch) -> None:
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    ll.llama_model_free(model)


class LlamaSequence:
    """One sequence's KV state in a llama.cpp context: a sequence id, given back when this is freed."""

    def __init__(self, model: LlamaCppModel):
        self.seq_id = model.take_sequence()
        weakref.finalize(self, model.drop_sequence, self.seq_id)


@dataclass(frozen=True)
class LlamaCppView:
    """A llama.cpp model behind the calls of the torch ModelView (every layer: no skip sets)."""

    model: LlamaCppModel

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # samplers' generators; llama.cpp places its own tensors

    @property
    def max_positions(self) -> int:
        return self.model.max_positions

    @property
    def exact_width(self) -> int | None:
        """The widest pass whose rows are bit-identical to one-token passes (measured at load)."""
        return self.model.exact_width

    @property
    def kv_pool(self) -> KVPool:
        """The positions and sequences the model's KV cache holds, all sequences together."""
        return self.model.kv_pool

    def new_cache(self) -> LlamaSequence:
        return LlamaSequence(self.model)

    def forward(self, token_ids: list[int], start: int, cache: LlamaSequence, num_logits: int) -> torch.Tensor:
        """Run `token_ids` at positions [start, start+S); return float32 logits [num_logits, V] of the last rows."""
        return self.forward_batch([SeqBlock(token_ids, start, cache, num_logits)])[0]

    def forward_batch(self, blocks: list[SeqBlock]) -> list[torch.Tensor]:
        """One llama_decode over many sequences (SeqBlocks whose caches are LlamaSequences): sequence b
        runs its tokens at [start_b, start_b + S_b) and gets float32 logits [num_logits_b, V]."""
        check_blocks(blocks, self.max_positions)
        rows = []
        for b in blocks:
            self.model.keep_before(b.cache.seq_id, b.start)  # rollback
            n = len(b.token_ids)  # rows asked for logits run; those before them may come from another sequence
            shared = self.model.share_prefix(b.cache.seq_id, b.token_ids, b.start, b.start + n - b.num_logits)
            rows += [(t, b.start + i, b.cache.seq_id, i >= n - b.num_logits) for i, t in enumerate(b.token_ids) if i >= shared]
        logits = torch.from_numpy(self.model.decode(rows))  # [sum(num_logits_b), V]
        return list(logits.split([b.num_logits for b in blocks]))

