"""The worker data plane over gRPC: a server that exposes a process's model workers, and a client
(`RemoteWorker`) with the same interface as `ModelWorker`, so levels cannot tell them apart.

One persistent bidirectional stream per client carries msgpack frames (protos/specrouter/v1/
worker.proto). Greedy calls move token ids only (one-hot rows are rebuilt on the client); sampled
calls move float32 probability rows, sparse (index, value) when top-k / top-p leave a small support.
A level on another vocabulary than the target's restricts its worker to the shared tokens: the mask
travels once per stream (as bits) and is named by its digest after that. See docs/protocol.md for
the sequence-state rules.

A `forward` or `draft` frame carries a batch of sequences' calls (one batched pass on the worker; a
single request is a batch of one); the reply holds each call's result, or the error that refused
that call alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import queue
import threading
from collections import Counter
from dataclasses import asdict
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import msgpack
import numpy as np
import torch

from specrouter.core.model import KVPool
from specrouter.core.sampling import SamplingParams, most_likely
from specrouter.core.sequence import PositionGapError, StaleVersionError
from specrouter.v1 import worker_pb2, worker_pb2_grpc
from specrouter.core.worker import DraftCall, DraftResult, ForwardCall, ModelWorker, Scored, WorkerUnavailable


class UnknownMaskError(ValueError):
    """A request named a token mask the server was never sent (its stream broke in between)."""


ERRORS = {"StaleVersion": StaleVersionError, "PositionGap": PositionGapError, "UnknownMask": UnknownMaskError, "ValueError": ValueError}
KINDS = {cls: kind for kind, cls in ERRORS.items()}


def encode_rows(probs: torch.Tensor, params: SamplingParams) -> dict:
    """The fewest bytes that carry the rows exactly: argmax ids when greedy (one-hot rows), only the
    non-zero entries when top-k / top-p leave a small support, else raw float32 rows."""
    if params.greedy:
        return {"argmax": most_likely(probs).tolist()}
    rows = probs.contiguous().float()  # [N, V]
    flat = rows.flatten()
    support = flat.nonzero().squeeze(1)  # [nnz] flat indices
    if 2 * support.numel() < flat.numel():  # (index, value) pairs are cheaper than the dense rows
        return {"index": support.to(torch.int32).numpy().tobytes(), "value": flat[support].numpy().tobytes(),
                "shape": list(rows.shape)}
    return {"rows": rows.numpy().tobytes(), "shape": list(rows.shape)}


def decode_rows(reply: dict, vocab_size: int) -> torch.Tensor:
    if "argmax" in reply:
        ids = torch.tensor(reply["argmax"], dtype=torch.long)
        return torch.zeros(len(ids), vocab_size).scatter_(-1, ids[:, None], 1.0)
    if "index" in reply:
        index = torch.frombuffer(bytearray(reply["index"]), dtype=torch.int32).long()
        value = torch.frombuffer(bytearray(reply["value"]), dtype=torch.float32)
        rows, cols = reply["shape"]
        return torch.zeros(rows * cols).index_put_((index,), value).reshape(rows, cols)
    if not reply["rows"]:  # no rows (a draft of k = 0): frombuffer refuses an empty buffer
        return torch.zeros(reply["shape"])
    return torch.frombuffer(bytearray(reply["rows"]), dtype=torch.float32).reshape(reply["shape"])


def encode_mask(allowed: torch.Tensor) -> tuple[str, bytes]:
    """allowed [V] bool -> (digest, packed bits)."""
    bits = np.packbits(allowed.numpy()).tobytes()
    return hashlib.sha256(bits).hexdigest()[:16] + f":{len(allowed)}", bits


def decode_mask(digest: str, bits: bytes) -> torch.Tensor:
    size = int(digest.rsplit(":", 1)[1])
    return torch.from_numpy(np.unpackbits(np.frombuffer(bits, dtype=np.uint8))[:size].astype(bool))


def _params(p: list) -> SamplingParams:
    return SamplingParams(temperature=p[0], top_k=p[1], top_p=p[2])


def _sampling(params: SamplingParams) -> list:
    return [params.temperature, params.top_k, params.top_p]


def _refusal(exc: Exception) -> dict:
    """An error as a reply (or a batched call's entry): its kind, so the caller raises the same type."""
    return {"ok": False, "kind": KINDS.get(type(exc), type(exc).__name__), "error": str(exc)}


def _error(reply: dict) -> Exception:
    return ERRORS.get(reply["kind"], RuntimeError)(reply["error"])


# One sequence's call inside a frame.


def _forward_fields(call: ForwardCall) -> dict:
    return {"seq": call.seq_id, "version": call.version, "start": call.start, "prefix": call.prefix_hash,
            "tokens": list(call.token_ids), "num_logits": call.num_logits, "sampling": _sampling(call.params),
            **({"confident": True} if call.confident else {})}


def _draft_fields(call: DraftCall) -> dict:
    return {"seq": call.seq_id, "version": call.version, "start": call.start, "prefix": call.prefix_hash,
            "tokens": list(call.token_ids), "k": call.k, "sampling": _sampling(call.params), "seed": call.seed,
            **({"min_conf": call.min_confidence} if call.min_confidence else {}),
            **({"plain": True} if call.plain else {})}


def _forward_call(m: dict) -> ForwardCall:
    return ForwardCall(m["seq"], m["version"], m["start"], m["prefix"], m["tokens"], m["num_logits"], _params(m["sampling"]),
                       m.get("confident", False))


def _draft_call(m: dict) -> DraftCall:
    return DraftCall(m["seq"], m["version"], m["start"], m["prefix"], m["tokens"], m["k"], _params(m["sampling"]), m["seed"],
                     m.get("min_conf", 0.0), m.get("plain", False))


def encode_scored(result: Scored, call: ForwardCall) -> dict:
    """A forward call's rows, and their top confidences if it asked for them."""
    return {**encode_rows(result.p, call.params), **({"top": result.top} if result.top is not None else {})}


def encode_draft(result: DraftResult, call: DraftCall) -> dict:
    """Drafted tokens and the drafter's confidence in each, plus their rows unless greedy (one-hot rows
    rebuilt from the tokens) or plain (none: a plain call returns no distributions)."""
    return {"tokens": result.token_ids, **({"conf": result.confidence} if result.confidence is not None else {}),
            **({} if call.params.greedy or call.plain else encode_rows(result.q_draft, call.params))}


def decode_draft(reply: dict, call: DraftCall, vocab_size: int) -> DraftResult:
    tokens = reply["tokens"]
    if call.plain:
        rows = torch.empty(0, vocab_size)
    else:
        rows = decode_rows({"argmax": tokens} if call.params.greedy else reply, vocab_size)
    return DraftResult(tokens, rows, reply.get("conf"))


def _encode_batch(results: list, calls: list, encode) -> list[dict]:
    """Each call's entry of a batched reply: encode(result, call), or the error that refused it."""
    return [_refusal(r) if isinstance(r, Exception) else {"ok": True, **encode(r, c)} for r, c in zip(results, calls)]


def _decode_batch(entries: list[dict], calls: list, decode) -> list:
    """Each call's result, decode(entry, call), or its error as an exception (not raised)."""
    return [decode(e, c) if e["ok"] else _error(e) for e, c in zip(entries, calls)]


# -- server ----------------------------------------------------------------------------------------------


def model_thread(name: str) -> ThreadPoolExecutor:
    """The one thread a worker process runs its model on, from loading to the last forward.

    OpenMP (torch's CPU threads) keeps a pool of worker threads for every thread that ever ran a
    parallel region, and once those pools together outnumber the cores, libgomp cuts its spin-wait
    to ~100 iterations: every op then pays a futex wake-up. A model loaded (quantised) on one thread
    and run on another made int8 matmuls 2x slower and remote drafting 50% slower (measured)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Serves the ModelWorkers of one process (a model and its slim views). Model calls run one at a
    time on `thread` (see model_thread: pass the one the model was loaded on), so the event loop
    stays free for health checks."""

    def __init__(self, name: str, workers: dict[str, ModelWorker], thread: ThreadPoolExecutor | None = None):
        self.name, self.workers = name, workers
        self._masks: dict[str, torch.Tensor] = {}  # allowed-token masks by digest
        self._executor = thread or model_thread(name)

    def _allowed(self, request: dict) -> torch.Tensor | None:
        digest = request.get("allowed")
        if digest is None:
            return None
        if "allowed_bits" in request:
            self._masks[digest] = decode_mask(digest, request["allowed_bits"])
        if digest not in self._masks:
            raise UnknownMaskError(f"unknown token mask {digest}: send its bits first")
        return self._masks[digest]

    def handle(self, request: dict) -> dict:
        worker = self.workers[request["view"]]
        op = request["op"]
        if op == "forward":
            calls = [_forward_call(m) for m in request["calls"]]
            return {"results": _encode_batch(worker.forward(calls, self._allowed(request)), calls, encode_scored)}
        if op == "draft":
            calls = [_draft_call(m) for m in request["calls"]]
            return {"results": _encode_batch(worker.draft(calls, self._allowed(request)), calls, encode_draft)}
        if op == "release":
            worker.release(request["seq"])
            return {}
        if op == "info":
            return worker_info(worker)
        raise ValueError(f"unknown op {op!r}")

    def _reply(self, call_id: int, payload: bytes) -> worker_pb2.Frame:
        try:
            reply = {"ok": True, **self.handle(msgpack.unpackb(payload))}
        except Exception as exc:  # every failure goes back to the caller, typed; the stream lives on
            reply = _refusal(exc)
        return worker_pb2.Frame(call_id=call_id, payload=msgpack.packb(reply))

    async def Session(self, request_iterator, context):
        loop = asyncio.get_running_loop()
        async for frame in request_iterator:
            yield await loop.run_in_executor(self._executor, self._reply, frame.call_id, frame.payload)

    async def Health(self, request, context):
        sequences = sum(w.num_sequences() for w in self.workers.values())
        return worker_pb2.HealthReply(ready=True, name=self.name, views=list(self.workers), sequences=sequences)


# -- client ----------------------------------------------------------------------------------------------


class _Stream:
    """One persistent bidi stream to a worker process, shared by its views; replies matched by call_id."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
        self._outbox: queue.Queue = queue.Queue()
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.closed: str | None = None
        self.bytes_sent = self.bytes_received = 0
        responses = worker_pb2_grpc.WorkerStub(self.channel).Session(iter(self._outbox.get, None))
        threading.Thread(target=self._read, args=(responses,), daemon=True, name=f"grpc-stream-{address}").start()

    def _read(self, responses) -> None:
        try:
            for frame in responses:
                self.bytes_received += len(frame.payload)
                future = self._pending.pop(frame.call_id, None)
                if future is not None:
                    future.set_result(msgpack.unpackb(frame.payload))
            reason = "stream ended"
        except grpc.RpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        with self._lock:
            self.closed = reason
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(ConnectionError(reason))

    def call(self, request: dict, timeout: float) -> dict:
        payload = msgpack.packb(request)
        future: Future = Future()
        with self._lock:
            if self.closed:
                raise ConnectionError(self.closed)
            call_id = next(self._ids)
            self._pending[call_id] = future
        self.bytes_sent += len(payload)
        self._outbox.put(worker_pb2.Frame(call_id=call_id, payload=payload))
        try:
            return future.result(timeout)
        except TimeoutError:
            self._pending.pop(call_id, None)
            raise

    def close(self) -> None:
        self._outbox.put(None)
        self.channel.close()


def worker_info(worker: ModelWorker) -> dict:
    """What a RemoteWorker needs to know of the worker it reaches: its rows, bit-exact width and KV pool."""
    return {"vocab_size": worker.vocab_size, "exact_width": worker.exact_width,
            "kv_pool": asdict(worker.kv_pool) if worker.kv_pool else None}


class RemoteWorker:
    """A `ModelWorker` in another process, reached over the data plane. `resolve` returns the worker
    process's current address, so a restarted process (new port) is found again."""

    def __init__(self, name: str, resolve, timeout_s: float = 60.0, info: dict | None = None):
        """`info`: the worker's `worker_info`, if known (else asked for)."""
        self.name = name
        self._resolve = resolve
        self.timeout_s = timeout_s
        self._stream: _Stream | None = None
        self._masks_sent: set[str] = set()  # masks the current stream's server holds
        self._mask_cache: tuple[torch.Tensor, str, bytes] | None = None  # the last mask and its encoding
        self.frames_sent: Counter[str] = Counter()  # frames sent, by op
        info = info or self._call({"op": "info"})
        self.vocab_size, self.exact_width = info["vocab_size"], info["exact_width"]
        self.kv_pool = KVPool(**info["kv_pool"]) if info["kv_pool"] else None

    @property
    def bytes_moved(self) -> int:
        return (self._stream.bytes_sent + self._stream.bytes_received) if self._stream else 0

    def _call(self, request: dict) -> dict:
        request = {"view": self.name, **request}
        self.frames_sent[request["op"]] += 1
        try:
            if self._stream is None or self._stream.closed:
                self._stream = _Stream(self._resolve())
                self._masks_sent = set()
            reply = self._stream.call(request, self.timeout_s)
        except (ConnectionError, TimeoutError, grpc.RpcError, OSError) as exc:
            if self._stream is not None:
                self._stream.close()  # a stream past its deadline may be wedged: the next call opens a new one
            self._stream = None
            raise WorkerUnavailable(self.name, str(exc) or type(exc).__name__) from exc
        if not reply["ok"]:
            raise _error(reply)
        return reply

    def _mask(self, allowed: torch.Tensor | None) -> dict:
        """The request fields naming `allowed`: its digest, and its bits unless this stream sent them."""
        if allowed is None:
            return {}
        if self._mask_cache is None or self._mask_cache[0] is not allowed:
            self._mask_cache = (allowed, *encode_mask(allowed))
        _, digest, bits = self._mask_cache
        if self._stream is not None and not self._stream.closed and digest in self._masks_sent:
            return {"allowed": digest}
        return {"allowed": digest, "allowed_bits": bits}

    def _call_masked(self, request: dict, allowed: torch.Tensor | None) -> dict:
        fields = self._mask(allowed)
        try:
            reply = self._call({**request, **fields})
        except UnknownMaskError:  # a new stream opened since the mask was named: send its bits
            fields["allowed_bits"] = self._mask_cache[2]
            reply = self._call({**request, **fields})
        if fields:
            self._masks_sent.add(fields["allowed"])
        return reply

    def forward(self, calls: list[ForwardCall], allowed=None) -> list[Scored | Exception]:
        """ModelWorker.forward in one frame: a Scored per call, or the StaleVersionError /
        PositionGapError that refused that call alone (returned, not raised)."""
        if not calls:
            return []
        reply = self._call_masked({"op": "forward", "calls": [_forward_fields(c) for c in calls]}, allowed)
        return _decode_batch(reply["results"], calls, lambda entry, call: Scored(decode_rows(entry, self.vocab_size), entry.get("top")))

    def draft(self, calls: list[DraftCall], allowed=None) -> list[DraftResult | Exception]:
        """ModelWorker.draft in one frame: a DraftResult per call, or the error that refused it."""
        if not calls:
            return []
        reply = self._call_masked({"op": "draft", "calls": [_draft_fields(c) for c in calls]}, allowed)
        return _decode_batch(reply["results"], calls, lambda entry, call: decode_draft(entry, call, self.vocab_size))

    def release(self, seq_id) -> None:
        if self._stream is None or self._stream.closed:
            return  # no live connection: a dead or restarted worker holds nothing of this sequence
        try:
            self._call({"op": "release", "seq": seq_id})
        except WorkerUnavailable:
            pass

    def close(self) -> None:
        if self._stream:
            self._stream.close()
