"""LoRA adapters by name in the bundle's N slots (aotlm/models/lora.py): what is registered,
which adapter each slot holds, and the host copy of the slots the runner uploads between steps.

A sequence under adapter X gets a slot when the scheduler admits it (``acquire``) and keeps it
while it runs; X stays in its slot while any sequence uses it. With every slot in use by other
adapters, X's sequence waits in the queue (FCFS, never an error) until one frees. An idle slot
is reused least recently used first. Adapters are read (and checked) once at registration and
kept in host memory, up to ``max_cpu_adapters`` of them (least recently used dropped, re-read
from disk on next use). Unregistering X refuses new requests for it at once; its running
sequences finish under it, then its slot frees. Each registration gets a fresh prefix-cache salt,
so KV computed under an adapter is shared only with the same load of the same adapter.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from aotlm.errors import AdapterError
from aotlm.models.lora import LoraConfig, empty_lora, write_slot
from aotlm.models.peft_adapter import Adapter, read_adapter
from aotlm.runtime.generation.sequence import Sequence

# A name is what a request's `model` says: no path separators, no leading dot.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_GONE = object()


class AdapterSlots:
    def __init__(
        self,
        lora: LoraConfig,
        layer_shapes: dict[str, tuple[int, ...]],
        dtype,
        upload: Callable[[dict], None],
        *,
        max_cpu_adapters: int = 64,
    ) -> None:
        self.lora = lora
        self.shapes = layer_shapes
        self.upload = upload
        self.max_cpu_adapters = max(max_cpu_adapters, lora.max_loras)
        self.paths: dict[str, Path] = {}  # registered: what /v1/models lists
        self._salts: dict[str, bytes] = {}
        self._host: OrderedDict[str, Adapter] = OrderedDict()
        # What each slot holds ([0] unused: the base): a name, None (empty), or _GONE (an
        # adapter unregistered while sequences still run under it: freed when they end).
        self._slot: list[str | object | None] = [None] * (lora.max_loras + 1)
        self._users = [0] * (lora.max_loras + 1)  # running sequences per slot
        self._idle_order: OrderedDict[int, None] = OrderedDict()  # idle slots, LRU first
        self._stacks = empty_lora(layer_shapes, lora, dtype)
        self._dirty = False
        self._loads = itertools.count(1)
        self.swaps = 0  # adapters written into a slot

    # ---- registry ---------------------------------------------------------------------------

    def register(self, name: str, path: str | Path) -> None:
        """Read and check the PEFT adapter at ``path`` under ``name``; AdapterError naming the
        field when it does not fit, leaving everything already registered as it was."""
        if not isinstance(name, str) or not NAME.match(name):
            raise AdapterError(
                f"lora_name: {name!r}: expected letters, digits, '.', '_', ':' or '-' "
                "(no path separators), at most 128"
            )
        if name in self.paths:
            raise AdapterError(f"lora_name: {name!r} is already loaded; unload it first")
        adapter = read_adapter(path, self.shapes, self.lora)
        self.paths[name] = Path(path)
        self._salts[name] = hashlib.sha256(f"lora:{name}:{next(self._loads)}".encode()).digest()
        self._keep(name, adapter)

    def unregister(self, name: str) -> None:
        if name not in self.paths:
            raise AdapterError(f"lora_name: {name!r} is not loaded")
        del self.paths[name], self._salts[name]
        self._host.pop(name, None)
        slot = self._slot_holding(name)
        if slot is None:
            return
        if self._users[slot]:
            self._slot[slot] = _GONE  # a new load under this name must not find these weights
        else:
            self._free(slot)

    def salt(self, name: str) -> bytes:
        """The prefix-cache salt of a registered adapter (KeyError when not registered)."""
        return self._salts[name]

    # ---- slots (the scheduler's SlotPolicy) -------------------------------------------------

    def acquire(self, seq: Sequence) -> bool:
        name = seq.adapter
        if name is None:
            seq.lora_slot = 0
            return True
        slot = self._slot_holding(name)
        if slot is None:
            slot = self._idle_slot()
            if slot is None:
                return False
            self._put(slot, name)
        self._users[slot] += 1
        self._idle_order.pop(slot, None)
        seq.lora_slot = slot
        return True

    def release(self, seq: Sequence) -> None:
        slot, seq.lora_slot = seq.lora_slot, 0
        if slot == 0:
            return
        self._users[slot] -= 1
        if self._users[slot] == 0:
            if self._slot[slot] is _GONE:  # unregistered while it ran: its slot frees now
                self._free(slot)
            else:
                self._idle_order[slot] = None

    def flush(self) -> None:
        """Upload the slots when they changed since the last step (between steps only)."""
        if self._dirty:
            self.upload(self._stacks)
            self._dirty = False

    def slot_of(self, name: str) -> int | None:
        return self._slot_holding(name)

    # ---- internals --------------------------------------------------------------------------

    def _slot_holding(self, name: str) -> int | None:
        try:
            return self._slot.index(name, 1)
        except ValueError:
            return None

    def _idle_slot(self) -> int | None:
        for slot in range(1, len(self._slot)):
            if self._slot[slot] is None:
                return slot
        if self._idle_order:
            return next(iter(self._idle_order))
        return None

    def _put(self, slot: int, name: str) -> None:
        adapter = self._host.get(name)
        if adapter is None:  # dropped from host memory: read it again
            adapter = read_adapter(self.paths[name], self.shapes, self.lora)
        self._keep(name, adapter)
        self._idle_order.pop(slot, None)
        write_slot(self._stacks, slot, adapter.updates, self.lora)
        self._slot[slot] = name
        self._dirty = True
        self.swaps += 1

    def _free(self, slot: int) -> None:
        write_slot(self._stacks, slot, {}, self.lora)
        self._slot[slot] = None
        self._idle_order.pop(slot, None)
        self._dirty = True

    def _keep(self, name: str, adapter: Adapter) -> None:
        self._host[name] = adapter
        self._host.move_to_end(name)
        while len(self._host) > self.max_cpu_adapters:
            self._host.popitem(last=False)
