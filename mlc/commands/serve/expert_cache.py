"""`mlc serve --expert-offload`: a mixture-of-experts model whose routed experts stay on disk, with an LRU cache of experts
in memory and activation-aware prefetch (MoE-Infinity, Pre-gated MoE, EdgeMoE).

Everything but the routed experts loads as usual. Each sparse layer's `experts` (models.transformer.Experts) is swapped
for an OffloadedExperts, which runs the same expert modules on the same inputs in the same order, so the output is the
in-memory model's bit for bit; only where the weights come from changes. An expert is read on demand with pread from the
safetensors files (the OS page cache holds what it holds; the cache below owns and counts its own copies) into an
ExpertCache of at most `capacity` bytes, evicting the least recently used expert to make room.

Prefetch: when layer l routes its tokens, the next sparse layer's router is applied to the same hidden states to predict
the experts it will pick (hidden states change little from one layer to the next, the observation Pre-gated MoE and
AdapMoE build on), and a background thread reads the missing ones while layer l computes. The prefetch thread only reads
bytes (pread releases the GIL, and no torch op of its own starts a second OpenMP pool, see Engine.run); modules are built
in the engine thread. A prefetch never evicts an expert the current layer still needs, and never exceeds the capacity.
"""

from __future__ import annotations

import copy
import math
import mmap
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlc.errors import InputError

Key = Hashable  # (layer index, expert index) in a model; anything hashable in the cache itself


@dataclass
class _Entry:
    nbytes: int
    raw: Any = None  # what read returned: its buffers are reused for the next read once this expert is evicted
    module: Any = None  # built once its bytes are read
    pending: Future | None = None  # a prefetch read in flight
    prefetched: bool = False  # brought in by a prefetch and not asked for since


class ExpertCache:
    """Least-recently-used experts within `capacity` bytes: get(key) returns a module, reading it when it is not held.

    read(key, spare) -> raw tensors (may run in the prefetch thread; spare: an evicted expert's raw tensors, whose memory
    it may fill instead of allocating), build(raw) -> the module (engine thread). Resident bytes count every expert held
    or being read, plus an evicted expert's buffers kept for the next read, and never exceed the capacity. Not
    thread-safe: one thread (the engine's) calls get and prefetch; the counters may be read from any thread.
    """

    def __init__(self, capacity: int, expert_bytes: int, read: Callable[[Key, Any], Any], build: Callable[[Any], Any], prefetch: bool = True):
        self.capacity, self.expert_bytes = capacity, expert_bytes
        self.read, self.build = read, build
        self.entries: OrderedDict[Key, _Entry] = OrderedDict()  # least recently used first
        self.spare: Any = None  # the raw tensors of the expert evicted last, until the next read reuses them
        self.resident_bytes = self.peak_resident_bytes = 0
        self.hits = self.misses = self.evictions = self.loaded_bytes = 0
        self.prefetched = self.prefetch_hits = 0  # experts read ahead; of those, asked for before being evicted
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mlc-expert-prefetch") if prefetch else None

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def keys(self) -> list[Key]:
        """The experts held, least recently used first."""
        return list(self.entries)

    def get(self, key: Key, protect: Iterable[Key] = ()) -> Any:
        """The expert's module (a hit), or read it now (a miss), evicting least recently used experts not in protect first."""
        entry = self.entries.get(key)
        if entry is not None:
            self.hits += 1
            self.prefetch_hits += entry.prefetched
            entry.prefetched = False
            self.entries.move_to_end(key)
            if entry.module is None:
                self._finish(key, entry)
            return entry.module
        self.misses += 1
        self._make_room(set(protect) | {key}, force=True)
        entry, spare = self._add(key, _Entry(self.expert_bytes))
        try:
            entry.raw = self.read(key, spare)
            entry.module = self.build(entry.raw)
        except BaseException:
            self._drop(key)
            raise
        return entry.module

    def prefetch(self, keys: Iterable[Key], protect: Iterable[Key] = ()) -> int:
        """Start reading those of keys not held, in order, while they fit without evicting protect or a read in flight.
        Returns how many reads it started."""
        if self._pool is None:
            return 0
        protect, started = set(protect), 0
        for key in keys:
            if key in self.entries:
                continue
            if not self._make_room(protect, force=False):
                break
            entry, spare = self._add(key, _Entry(self.expert_bytes, prefetched=True))
            entry.pending = self._pool.submit(self.read, key, spare)
            self.prefetched += 1
            started += 1
        return started

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def summary(self) -> dict[str, float]:
        """The counters, for the run record and the log line at shutdown."""
        calls = self.hits + self.misses
        return {
            "expert_cache_hits": self.hits, "expert_cache_misses": self.misses, "expert_cache_hit_rate": self.hits / calls if calls else 0.0,
            "expert_cache_evictions": self.evictions, "expert_cache_loaded_bytes": self.loaded_bytes,
            "expert_cache_prefetched": self.prefetched, "expert_cache_prefetch_hits": self.prefetch_hits,
            "expert_cache_resident_bytes": self.resident_bytes, "expert_cache_peak_resident_bytes": self.peak_resident_bytes,
            "expert_cache_capacity_bytes": self.capacity,
        }

    def _add(self, key: Key, entry: _Entry) -> tuple[_Entry, Any]:
        """Hold entry (its bytes now count) and hand over the spare buffers for its read, if any (already counted)."""
        self.entries[key] = entry
        spare, self.spare = self.spare, None
        if spare is None:
            self.resident_bytes += entry.nbytes
        self.loaded_bytes += entry.nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        return entry, spare

    def _drop(self, key: Key) -> None:
        self.resident_bytes -= self.entries.pop(key).nbytes

    def _finish(self, key: Key, entry: _Entry) -> None:
        try:
            entry.raw = entry.pending.result()
            entry.module = self.build(entry.raw)
        except BaseException:
            self._drop(key)
            raise
        entry.pending = None

    def _fits(self) -> bool:
        return self.spare is not None or self.resident_bytes + self.expert_bytes <= self.capacity

    def _make_room(self, protect: set[Key], force: bool) -> bool:
        """Evict until one more expert fits, least recently used first: experts outside protect, then (with force only)
        those in it. Without force, reads in flight are not evicted; with it, an evicted read is waited for first.
        The evicted expert's buffers become the spare (still counted) that the next read fills."""
        for protected in (False, True) if force else (False,):
            for key in [k for k in self.entries if (k in protect) == protected]:
                if self._fits():
                    return True
                entry = self.entries[key]
                if entry.pending is not None:
                    if not force:
                        continue
                    if entry.pending.exception() is None:  # its buffer is being written: let the read finish first
                        entry.raw = entry.pending.result()
                self.evictions += 1
                if entry.raw is not None:  # the module goes; its memory is read into next (an expert runs only inside get's caller)
                    del self.entries[key]
                    self.spare = entry.raw
                else:
                    self._drop(key)
        return self._fits()


# ----- reading experts from the safetensors files -----


@dataclass(frozen=True)
class _Part:
    """One tensor of an expert module: the stored tensors whose bytes, one after another, make it (two for a fused gate_up)."""

    name: str  # the parameter's name inside the expert module (w1.weight, gate_up_proj.weight)
    shape: tuple[int, ...]
    dtype: torch.dtype  # as stored
    sources: tuple[tuple[int, int, int], ...]  # (fd, offset, nbytes) of each stored piece


def _pread_into(view: memoryview, sources: Iterable[tuple[int, int, int]]) -> None:
    """Fill view with the bytes of sources, in order (pread: no shared file position, GIL released)."""
    at = 0
    for fd, offset, nbytes in sources:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[at + done : at + nbytes]], offset + done)
            if n <= 0:
                raise InputError(f"a safetensors file ended while reading an expert at byte {offset + done}", "the file is truncated")
            done += n
        at += nbytes


@dataclass
class ExpertBytes:
    """One expert's tensors as stored, over anonymous mappings that the next expert read after its eviction refills."""

    tensors: dict[str, torch.Tensor]
    buffers: dict[str, mmap.mmap]


def read_parts(parts: list[_Part], spare: ExpertBytes | None = None) -> ExpertBytes:
    """The tensors of one expert, as stored (safe in the prefetch thread: no torch kernels run), in spare's memory or new.

    Each tensor has its own anonymous mapping, unmapped when the last tensor over it is freed. Buffers from malloc were
    kept in the heap after eviction (glibc's per-thread arenas and growing mmap threshold: peak RSS ran 200-300 MiB above
    the cache on SmolLM2 8x2), and a fresh mapping per read costs its page faults: 2.5 ms of CPU against 0.7 ms to refill
    a spare one, for a 5.3 MB expert from the page cache here.
    """
    tensors, buffers = {}, {}
    for p in parts:
        buf = spare.buffers[p.name] if spare is not None else None
        if buf is None:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
            buf = mmap.mmap(-1, math.prod(p.shape) * p.dtype.itemsize, flags=flags)
        _pread_into(memoryview(buf), p.sources)
        tensors[p.name], buffers[p.name] = torch.frombuffer(buf, dtype=p.dtype).view(p.shape), buf
    return ExpertBytes(tensors, buffers)


class OffloadedExperts(nn.Module):
    """A sparse layer's routed experts, fetched through an ExpertCache: Experts.mix's arithmetic, in the same order.

    The expert calls are scheduled with the held experts first (a miss read first could evict a needed expert that is held
    now), but their outputs are summed in ascending expert order, as Experts.mix sums them.
    """

    def __init__(self, cache: ExpertCache, layer: int, num_experts: int):
        super().__init__()
        self.cache, self.layer, self.num_experts = cache, layer, num_experts
        self.predict: Callable[[torch.Tensor], list[Key]] | None = None  # the next sparse layer's experts for these hidden states

    def __len__(self) -> int:
        return self.num_experts

    def mix(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        needed = chosen.unique().tolist()
        protect = {(self.layer, e) for e in needed}
        if self.predict is not None:
            self.cache.prefetch(self.predict(flat), protect)
        outputs = {}
        for e in sorted(needed, key=lambda e: (self.layer, e) not in self.cache):
            token, slot = torch.where(chosen == e)
            outputs[e] = token, self._run(e, flat[token], protect) * weights[token, slot, None]
            protect.discard((self.layer, e))
        out = torch.zeros_like(flat)
        for e in needed:
            token, y = outputs[e]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def _run(self, e: int, x: torch.Tensor, protect: set[Key]) -> torch.Tensor:
        # The module is referenced only here, so an expert evicted by the next get is freed at once.
        return self.cache.get((self.layer, e), protect)(x)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded"


def next_layer_predictor(gate: nn.Module, layer: int, top_k: int) -> Callable[[torch.Tensor], list[Key]]:
    """keys of the experts `gate` (the next sparse layer's router) picks for hidden states x, most-picked first."""

    def predict(x: torch.Tensor) -> list[Key]:
        picks = gate(x).topk(top_k, dim=-1).indices.flatten()  # softmax keeps the order: top-k of the logits
        counts = torch.bincount(picks)
        return [(layer, e) for e in counts.argsort(descending=True, stable=True)[: int((counts > 0).sum())].tolist()]

    return predict


def is_expert_tensor(name: str) -> bool:
    """Whether a checkpoint tensor is a routed expert's (the shared expert of Qwen2-MoE stays resident)."""
    return ".experts." in name


@dataclass
class ExpertSizes:
    """What the experts of a model take at the dtype they load in."""

    expert_bytes: int  # one routed expert
    all_experts_bytes: int
    other_bytes: int  # every other weight (attention, norms, embeddings, routers, shared experts)
    top_k: int
    num_experts: int
    sparse_layers: int


def expert_sizes(path: Path, dtype: str) -> ExpertSizes:
    """ExpertSizes from the safetensors headers; InputError for a dense or quantised model."""
    from mlc.commands.serve.footprint import footprint
    from mlc.io.hfdir import read_config
    from mlc.io.safetensors_reader import ModelTensors
    from mlc.models.config import config_from_hf

    raw = read_config(path)
    config = config_from_hf(raw)
    if not config.is_moe:
        raise InputError(f"--expert-offload: {path.name} is a dense model (no experts to offload)", "leave out --expert-offload, or serve a mixture-of-experts model (e.g. one made by `mlc upcycle`)")
    if "quantization_config" in raw:
        raise InputError("--expert-offload does not read quantised experts yet", "serve the unquantised model with --expert-offload, or the quantised one without it")
    total, _ = footprint(path, dtype, 0)
    target = None if dtype == "auto" else getattr(torch, dtype)
    experts = 0
    with ModelTensors(path) as tensors:
        for name, info in tensors.infos.items():
            if is_expert_tensor(name):
                experts += info.numel * (target.itemsize if target is not None and info.dtype.is_floating_point else info.dtype.itemsize)
    sparse = sum(config.layer_is_sparse(i) for i in range(config.num_hidden_layers))
    count = sparse * config.num_experts
    return ExpertSizes(experts // count, experts, total - experts, config.num_experts_per_tok, config.num_experts, sparse)


def expert_capacity(path: Path, dtype: str, kv_bytes: int, max_memory: int) -> int:
    """Bytes left for cached experts when --max-memory holds the other weights, the KV cache and the cache of experts.

    InputError when that is less than one layer's top-k experts (a step could not run) or the other weights do not fit.
    """
    from mlc.commands.serve.footprint import mib

    s = expert_sizes(path, dtype)
    capacity = max_memory - s.other_bytes - kv_bytes
    need = s.top_k * s.expert_bytes
    if capacity < need:
        raise InputError(
            f"--max-memory {mib(max_memory)} leaves {mib(max(capacity, 0))} for experts after the other weights ({mib(s.other_bytes)}) and the KV "
            f"cache ({mib(kv_bytes)}), less than one layer's top-{s.top_k} experts ({mib(need)})",
            f"raise --max-memory to at least {math.ceil((s.other_bytes + kv_bytes + need) / 2**20 * 10) / 10:.1f} MiB, or lower --kv-cache-memory",
        )
    return min(capacity, s.all_experts_bytes)  # more than every expert buys nothing


def load_offloaded(path: Path, dtype: str | None, capacity: int, fuse: bool = False, prefetch: bool = True) -> Any:
    """The model at path with its routed experts left on disk behind an ExpertCache of capacity bytes (model.expert_cache).

    fuse: build each expert as fuse_projections would leave it (gate and up stacked), for a model that will be fused.
    """
    from mlc.io.safetensors_reader import ModelTensors
    from mlc.models import load_model
    from mlc.models.transformer import MLP, SparseMoE

    model = load_model(path, dtype=dtype, skip=is_expert_tensor)
    target = next(model.parameters()).dtype
    tensors = ModelTensors(path)  # kept open (its file descriptors) for the life of the model
    fds = {file: sf._fileno() for file, sf in tensors.files.items()}
    moes = [(i, layer.ffn_name, getattr(layer, layer.ffn_name)) for i, layer in enumerate(model.model.layers)]
    moes = [(i, name, m) for i, name, m in moes if isinstance(m, SparseMoE)]
    template = copy.deepcopy(moes[0][2].experts[0])  # on the meta device
    if fuse and isinstance(template, MLP):
        template.fuse_gate_up()
    part_names = {"gate_up_proj.weight": ("gate_proj.weight", "up_proj.weight")}
    shapes = {n: (tuple(p.shape), p.dtype) for n, p in template.named_parameters()}
    plans: dict[Key, list[_Part]] = {}
    for i, ffn_name, _ in moes:
        for e in range(model.config.num_experts):
            prefix = f"model.layers.{i}.{ffn_name}.experts.{e}."
            parts = []
            for name, (shape, _) in shapes.items():
                infos = [tensors.info(prefix + n) for n in part_names.get(name, (name,))]
                parts.append(_Part(name, shape, infos[0].dtype, tuple((fds[f.file], f.start, f.nbytes) for f in infos)))
            plans[(i, e)] = parts

    def build(raw: ExpertBytes) -> nn.Module:
        module = copy.deepcopy(template)
        module.load_state_dict({n: t if t.dtype == target else t.to(target) for n, t in raw.tensors.items()}, assign=True)
        return module.eval()

    expert_bytes = sum(math.prod(s) for s, _ in shapes.values()) * target.itemsize
    cache = ExpertCache(capacity, expert_bytes, lambda key, spare: read_parts(plans[key], spare), build, prefetch=prefetch)
    cache.tensors = tensors  # type: ignore[attr-defined]
    for (i, _, moe), nxt in zip(moes, [*moes[1:], None]):
        moe.experts = OffloadedExperts(cache, i, model.config.num_experts)
        if nxt is not None:
            moe.experts.predict = next_layer_predictor(nxt[2].gate, nxt[0], moe.top_k)
    model.expert_cache = cache  # type: ignore[assignment]
    return model


def register_metrics(cache: ExpertCache, registry: Any, labels: dict[str, str]) -> None:
    """Serve the cache's counters on /metrics (mlc: prefix: vLLM has no such series)."""
    registry.register(_CacheCollector(cache, labels))


class _CacheCollector:
    def __init__(self, cache: ExpertCache, labels: dict[str, str]):
        self.cache, self.labels = cache, labels

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c, names, values = self.cache, list(self.labels), list(self.labels.values())
        for name, doc, value in (
            ("mlc:expert_cache_hits", "Expert calls served from the expert cache (--expert-offload).", c.hits),
            ("mlc:expert_cache_misses", "Expert calls that read the expert from disk first.", c.misses),
            ("mlc:expert_cache_evictions", "Experts evicted from the expert cache (least recently used).", c.evictions),
            ("mlc:expert_cache_loaded_bytes", "Bytes of experts read from disk, prefetches included.", c.loaded_bytes),
            ("mlc:expert_cache_prefetches", "Experts read ahead of their layer (predicted by the next layer's router).", c.prefetched),
            ("mlc:expert_cache_prefetch_hits", "Prefetched experts that were used before being evicted.", c.prefetch_hits),
        ):
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            yield family
        for name, doc, value in (
            ("mlc:expert_cache_resident_bytes", "Bytes of experts held in memory (or being read into it).", c.resident_bytes),
            ("mlc:expert_cache_capacity_bytes", "The expert cache's size: what --max-memory leaves after the other weights and the KV cache.", c.capacity),
        ):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            yield family


def log_summary(cache: ExpertCache) -> dict[str, float]:
    """Stop the prefetch thread, log the cache's counters in one line, and return them (for the run record)."""
    from mlc import console
    from mlc.commands.serve.footprint import mib

    cache.close()
    s = cache.summary()
    console.info(
        f"expert cache: {s['expert_cache_hits']:.0f} hits, {s['expert_cache_misses']:.0f} misses (hit rate {s['expert_cache_hit_rate']:.1%}), "
        f"{s['expert_cache_evictions']:.0f} evictions, {mib(s['expert_cache_loaded_bytes'])} read, {s['expert_cache_prefetched']:.0f} prefetched "
        f"({s['expert_cache_prefetch_hits']:.0f} used), peak {mib(s['expert_cache_peak_resident_bytes'])} of {mib(cache.capacity)}"
    )
    return s
