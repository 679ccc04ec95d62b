"""Count backend compiles after the runtime is sealed.

jax.monitoring fires the backend-compile event for every XLA compile (also on persistent-cache
hits), so a counter that starts at `seal()` measures exactly the compiles that serving caused.
"""

from __future__ import annotations

import threading

import jax

from aotlm.errors import CompileAfterReadyError

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sealed = False
        self.before_seal = 0
        self.after_seal = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: object) -> None:
        if event != BACKEND_COMPILE_EVENT:
            return
        with self._lock:
            if self._sealed:
                self.after_seal += 1
            else:
                self.before_seal += 1

    def seal(self) -> None:
        """From now on every compile is a bug: it is counted (and fails `check` in strict mode)."""
        with self._lock:
            self._sealed = True

    @property
    def sealed(self) -> bool:
        return self._sealed

    def check(self) -> None:
        if self.after_seal:
            raise CompileAfterReadyError(
                f"{self.after_seal} XLA compile(s) happened after the runtime was sealed"
            )

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)
