"""One native vCPU (``lm_vcpu``): a thin wrapper that owns the handle.

Each call is one native call through :func:`livemig.native.check`; the
blocking ones (pause, wait) run without the GIL, as cffi API-mode calls do.
The vCPU keeps its region alive by attaching to the GuestMemory.
"""
from __future__ import annotations

import errno

from ..errors import GuestTimeout, LivemigError, VMBusy
from ..native import check, ffi, lib
from ..native.handles import NativeHandle

NO_STOP = (1 << 64) - 1


class VCpu:
    def __init__(self, memory, vcpu_id: int):
        out = ffi.new("lm_vcpu **")
        check(lib.lm_vcpu_create(memory.handle, vcpu_id, out), f"creating vCPU {vcpu_id}")
        # lm_vcpu_destroy stops the thread before the region can be unmapped.
        self._native = NativeHandle(out[0], lib.lm_vcpu_destroy, parent=memory.native_handle)
        self.id = vcpu_id
        self._memory = memory
        memory.attach(self)

    @property
    def handle(self):
        if self._native.released:
            raise LivemigError(f"vCPU {self.id} is closed")
        return self._native.ptr

    def resume(self) -> None:
        check(lib.lm_vcpu_resume(self.handle), f"resuming vCPU {self.id}")

    def pause(self, timeout_s: float = 5.0) -> None:
        rc = lib.lm_vcpu_pause(self.handle, int(timeout_s * 1000))
        if rc == -errno.ETIMEDOUT:
            raise GuestTimeout(f"vCPU {self.id} did not park within {timeout_s} s")
        check(rc, f"pausing vCPU {self.id}")

    def request_pause(self) -> None:
        """Ask the vCPU to park at its next instruction boundary; do not wait."""
        rc = lib.lm_vcpu_pause(self.handle, 0)
        if rc != -errno.ETIMEDOUT:
            check(rc, f"pausing vCPU {self.id}")

    def wait_parked(self, timeout_s: float) -> bool:
        rc = lib.lm_vcpu_wait_parked(self.handle, max(0, int(timeout_s * 1000)))
        if rc == -errno.ETIMEDOUT:
            return False
        check(rc, f"waiting for vCPU {self.id}")
        return True

    def set_stop_step(self, step: int | None) -> None:
        lib.lm_vcpu_set_stop_step(self.handle, NO_STOP if step is None else step)

    def set_throttle(self, pct: int) -> None:
        check(lib.lm_vcpu_set_throttle(self.handle, pct), f"throttling vCPU {self.id}",
              "the throttle is a percentage 0..99")

    def set_pace(self, ticks_per_s: int) -> None:
        check(lib.lm_vcpu_set_pace(self.handle, max(0, int(ticks_per_s))), "pacing vCPU")

    @property
    def status(self) -> int:
        return lib.lm_vcpu_status(self.handle)

    def counters(self) -> tuple[int, int, int]:
        """(steps, ticks, stores), readable while running."""
        c = ffi.new("lm_vcpu_counters *")
        lib.lm_vcpu_counters_read(self.handle, c)
        return c.steps, c.ticks, c.stores

    def get_state(self):
        """A copy of the register/device state (a cffi ``lm_vcpu_state``)."""
        st = ffi.new("lm_vcpu_state *")
        rc = lib.lm_vcpu_get_state(self.handle, st)
        if rc == -errno.EBUSY:
            raise VMBusy(f"vCPU {self.id} is running; pause it to read its state")
        check(rc, "reading vCPU state")
        return st

    def set_state(self, st) -> None:
        rc = lib.lm_vcpu_set_state(self.handle, st)
        if rc == -errno.EBUSY:
            raise VMBusy(f"vCPU {self.id} is running; pause it to set its state")
        check(rc, "setting vCPU state")

    def console_tail(self) -> bytes:
        buf = ffi.new("uint8_t[]", lib.LM_VCPU_CONSOLE_TAIL)
        rc = lib.lm_vcpu_console_read(self.handle, buf, lib.LM_VCPU_CONSOLE_TAIL)
        if rc == -errno.EBUSY:
            raise VMBusy(f"vCPU {self.id} is running; pause it to read its console")
        n = check(rc, "reading the console")
        return bytes(ffi.buffer(buf, n))

    def set_console_tail(self, data: bytes) -> None:
        rc = lib.lm_vcpu_console_set(self.handle, data, len(data))
        if rc == -errno.EBUSY:
            raise VMBusy(f"vCPU {self.id} is running; pause it to set its console")
        check(rc, "setting the console", f"at most {lib.LM_VCPU_CONSOLE_TAIL} bytes")

    def close(self) -> None:
        if self._native.released:
            return
        self._native.release()
        self._memory.detach(self)
