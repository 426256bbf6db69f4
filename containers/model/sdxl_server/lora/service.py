"""The server's LoRA, end to end: a request's adapters from its refs (allow-list, names, fetch, read, rank),
the adapters preloaded at start (SDXL_LORAS), and what health says of them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sdxl_server import logs
from sdxl_server.errors import Forbidden, InvalidRequest, ModelLoadError, ServerError, SettingsError
from sdxl_server.lora.sources import MAX_ADAPTERS, AllowList, parse_preloaded

if TYPE_CHECKING:
    from sdxl_server.lora.adapters import Adapter
    from sdxl_server.lora.slots import Slots
    from sdxl_server.lora.sources import Source
    from sdxl_server.lora.store import Fetched, Store
    from sdxl_server.schema import LoraRef
    from sdxl_server.settings import Settings

Resolved = tuple[tuple["Adapter", float], ...]

MAX_LISTED = 20  # health's "cached": the most recently used, enough to see what a server holds
# Fetches and reads get threads of their own: on asyncio's default pool, requests waiting on one slow
# download would hold every thread, and finished images would wait there to be encoded.
FETCH_THREADS = 4
NOT_ALLOWED = (
    "LoRA sources are not allowed on this server: its operator sets SDXL_LORA_SOURCES (sdxlctl: [model] lora_sources)"
)
OFF = (
    "LoRA adapters are off on this server: its operator preloads named adapters with SDXL_LORAS "
    "(sdxlctl: [model] loras) or allows sources with SDXL_LORA_SOURCES (sdxlctl: [model] lora_sources)"
)


class Loras:
    """LoRA on one server: what requests may name, the adapters read so far, and the slot they go into.

    Off (no slot: neither SDXL_LORA_SOURCES nor SDXL_LORAS) every ref is a 403 and nothing of peft, the
    store or the adapter reader is imported. On, a source passes the allow-list before anything is fetched
    (its canonical URI, so no `..` trick gets past), then the store fetches it (single-flight, disk cache)
    and it is read once per version (single-flight too) and kept in memory, LRU of SDXL_LORA_MEMORY.
    """

    def __init__(
        self,
        *,
        slots: Slots | None,
        store: Store | None = None,
        allow: AllowList | None = None,
        preload_sources: dict[str, Source] | None = None,
        memory: int = 8,
    ) -> None:
        self.slots = slots
        self.store = store
        self.allow = allow
        self.preload_sources = preload_sources or {}
        self.memory = memory
        self.preloaded: dict[str, Adapter] = {}  # name -> adapter, pinned on the device and on disk
        self._pinned: dict[str, Adapter] = {}  # key -> preloaded adapter
        self._pool: ThreadPoolExecutor | None = None  # made on the first fetch: LoRA off makes none
        self._read: OrderedDict[str, Adapter] = OrderedDict()  # key -> adapter, least recently used first
        self._reading: dict[str, asyncio.Future[Adapter]] = {}  # key -> the one read in flight
        self._keys: dict[str, str] = {}  # canonical URI -> key of its latest version fetched

    @classmethod
    def from_settings(cls, settings: Settings, slots: Slots | None) -> Loras:
        """The server's LoRA from its settings; `slots` None (LoRA off) refuses every ref."""
        if slots is None:
            return cls(slots=None)
        from sdxl_server.lora.store import Store

        try:
            allow = AllowList.parse(settings.lora_sources)
        except ValueError as exc:
            raise SettingsError(f"SDXL_LORA_SOURCES is invalid: {exc}", field="SDXL_LORA_SOURCES") from None
        try:
            preload = parse_preloaded(settings.loras)
        except ValueError as exc:
            raise SettingsError(f"SDXL_LORAS is invalid: {exc}", field="SDXL_LORAS") from None
        store = Store(
            settings.cache_dir / "loras", max_bytes=settings.lora_max_bytes, budget_bytes=settings.lora_cache_bytes
        )
        return cls(slots=slots, store=store, allow=allow, preload_sources=preload, memory=settings.lora_memory)

    def preload(self) -> None:
        """Fetch, check and pin SDXL_LORAS' adapters (blocking, before warm-up); a failure names the entry."""
        if not self.preload_sources:
            return
        slots, store = self._ready()
        from sdxl_server.lora.adapters import read_adapter

        for name, source in self.preload_sources.items():
            try:
                fetched = store.fetch(source, field="SDXL_LORAS")
                adapter = read_adapter(
                    fetched.path, key=fetched.key, label=source.uri, targets=slots.targets, field="SDXL_LORAS"
                )
                if adapter.rank > slots.rank:
                    raise ModelLoadError(
                        f"rank {adapter.rank} exceeds SDXL_LORA_MAX_RANK={slots.rank}: raise SDXL_LORA_MAX_RANK "
                        "(sdxlctl: [model] lora_max_rank) or preload a smaller adapter"
                    )
            except Exception as exc:
                known = isinstance(exc, ServerError | ModelLoadError)  # their messages say what and what to do
                why = str(exc) if known else f"{type(exc).__name__}: {exc}"
                raise ModelLoadError(f"SDXL_LORAS: {name}: {why.removeprefix('SDXL_LORAS: ')}") from None
            adapter = dataclasses.replace(adapter, label=name)  # read as its source, so errors say which file
            store.pin(fetched.key)
            slots.pin(adapter)
            self.preloaded[name] = self._pinned[fetched.key] = adapter
            self._keys[source.uri] = fetched.key
            logs.log("lora preloaded", adapter=name, source=source.uri, rank=adapter.rank, bytes=adapter.size)

    async def resolve(self, refs: tuple[LoraRef, ...]) -> Resolved:
        """The adapters and scales of a request's refs, ready for the slot; () for ().

        Raises Forbidden (off, or a source outside SDXL_LORA_SOURCES), InvalidRequest (an unknown name, a
        file that is missing, too big or not an SDXL LoRA, ranks over the slot's) or FetchFailed.
        """
        if not refs:
            return ()
        for ref in refs:  # every ref is allowed before any is fetched
            self._check(ref)
        found = await asyncio.gather(*(self._adapter(ref) for ref in refs), return_exceptions=True)
        adapters: list[Adapter] = []
        for result in found:  # the first failure in the request's order, whichever finished first
            if isinstance(result, BaseException):
                raise result
            adapters.append(result)
        self._check_ranks(refs, adapters)
        return tuple((adapter, ref.scale) for adapter, ref in zip(adapters, refs, strict=True))

    def health(self) -> dict[str, Any] | None:
        """Health's "lora" object; None when LoRA is off."""
        if self.slots is None or self.store is None or self.allow is None:
            return None
        resident = self.slots.resident()
        # Preloaded adapters first, by name, from what was read: a local file or an offline Hub file is used in
        # place and never enters the disk cache's index, yet it is on the device for good.
        cached = [
            {"adapter": name, "bytes": adapter.size, "in_memory": adapter.key in resident}
            for name, adapter in sorted(self.preloaded.items())
        ]
        for entry in self.store.entries():
            if len(cached) >= max(MAX_LISTED, len(self.preloaded)):
                break
            uri = entry["adapter"]
            key = entry.get("key") or self._keys.get(uri)
            if key in self._pinned:  # a preloaded gs:// or online Hub file: listed above by its name
                continue
            cached.append({"adapter": uri, "bytes": entry["bytes"], "in_memory": key in resident})
        return {
            "max_rank": self.slots.rank,
            "max_adapters": MAX_ADAPTERS,
            "sources": len(self.allow.prefixes),
            "preloaded": sorted(self.preloaded),
            "cached": cached,
        }

    def _ready(self) -> tuple[Slots, Store]:
        assert self.slots is not None and self.store is not None, "LoRA is off"
        return self.slots, self.store

    def _check(self, ref: LoraRef) -> None:
        """403 or 400 for a ref that names nothing this server may use; nothing is fetched yet."""
        if ref.name is not None:
            field = _field(ref, "name")
            if self.slots is None:
                raise Forbidden(OFF, field=field)
            if ref.name not in self.preloaded:
                names = ", ".join(sorted(self.preloaded)) or "none"
                raise InvalidRequest(
                    f"{field}: no preloaded adapter {ref.name!r}; this server preloads: {names} (SDXL_LORAS)",
                    field=field,
                )
            return
        assert ref.source is not None
        field = _field(ref, "source")
        if self.slots is None or self.allow is None or not self.allow.prefixes:
            raise Forbidden(NOT_ALLOWED, field=field)
        if not self.allow.allows(ref.source):
            # The prefixes themselves are the operator's business: the client learns only that it is outside.
            raise Forbidden(
                f"{field}: {ref.source.uri} is not under an allowed prefix (SDXL_LORA_SOURCES)", field=field
            )

    async def _adapter(self, ref: LoraRef) -> Adapter:
        if ref.name is not None:
            return self.preloaded[ref.name]
        assert ref.source is not None
        _slots, store = self._ready()
        field = _field(ref, "source")
        # Every use asks the store: it re-reads the metadata only, and a replaced object is a new version.
        try:
            fetched = await self._in_thread(store.fetch, ref.source, field=field)
        except ServerError as exc:
            raise _placed(exc, field) from None
        self._keys[ref.source.uri] = fetched.key
        try:
            return await self._read_once(fetched, label=ref.source.uri, field=field)
        except InvalidRequest as exc:
            if exc.field == field:
                raise
            # Read for another request, where this adapter had another index: this request's field.
            raise InvalidRequest(exc.message.replace(exc.field or "", field), field=field) from None

    async def _read_once(self, fetched: Fetched, *, label: str, field: str) -> Adapter:
        key = fetched.key
        if key in self._pinned:
            return self._pinned[key]
        if key in self._read:
            self._read.move_to_end(key)
            return self._read[key]
        reading = self._reading.get(key)
        if reading is None:
            from sdxl_server.lora.adapters import read_adapter

            slots, _store = self._ready()
            reading = asyncio.ensure_future(
                self._in_thread(read_adapter, fetched.path, key=key, label=label, targets=slots.targets, field=field)
            )
            self._reading[key] = reading
            reading.add_done_callback(lambda done: self._finished_reading(key, done))
        # Shielded: a request that gives up (time limit, client gone) leaves the read to finish for the next.
        return await asyncio.shield(reading)

    async def _in_thread(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """`call` on one of the LoRA threads (FETCH_THREADS), not asyncio's default pool."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="sdxl-lora")
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: call(*args, **kwargs))

    def _finished_reading(self, key: str, done: asyncio.Future[Adapter]) -> None:
        self._reading.pop(key, None)
        if done.cancelled() or done.exception() is not None:
            return
        self._read[key] = done.result()
        while len(self._read) > self.memory:
            self._read.popitem(last=False)

    def _check_ranks(self, refs: tuple[LoraRef, ...], adapters: list[Adapter]) -> None:
        slots, _store = self._ready()
        ranks = [adapter.rank for adapter in adapters]
        if sum(ranks) <= slots.rank:
            return
        field = refs[0].field.partition("[")[0]  # parameters.lora, or parameters.lora_id
        summed = (
            f"ranks {' + '.join(map(str, ranks))} = {sum(ranks)} exceed"
            if len(ranks) > 1
            else f"rank {ranks[0]} exceeds"
        )
        raise InvalidRequest(
            f"{field}: {summed} SDXL_LORA_MAX_RANK={slots.rank}, the rank the server prepared for hot-swap: use "
            "fewer adapters or ask the operator to raise it (every request then costs a little more)",
            field=field,
        )


def _field(ref: LoraRef, part: str) -> str:
    """Where in the request a ref's source or name is: `parameters.lora[1].source`, or `parameters.lora_id`
    (the alias is itself the source)."""
    return ref.field if ref.field.endswith("lora_id") else f"{ref.field}.{part}"


def _placed(exc: ServerError, field: str) -> ServerError:
    """The store's refusal saying where in the request, as every other 400 does (the store also serves
    SDXL_LORAS, whose failures preload names its own way)."""
    if exc.message.startswith(f"{field}: "):
        return exc
    return type(exc)(f"{field}: {exc.message}", field=field, retry_after=exc.retry_after)


def labels(refs: tuple[LoraRef, ...]) -> list[str]:
    """The predict log line's `loras`: each adapter's name or source URI, and its scale."""
    return [
        f"{ref.name if ref.name is not None else ref.source.uri if ref.source else '?'}:{ref.scale:g}" for ref in refs
    ]
