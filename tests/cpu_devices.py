"""XLA_FLAGS for tests that fake several CPU devices (import it from tests and the processes they start).

XLA:CPU aborts a program when one device's thread reaches a collective more than 40 s after another's. On a
loaded 2-core machine a device thread that is behind on earlier programs (programs without collectives let the
devices drift apart) can be that late, so tests allow 3 minutes. A true deadlock still aborts, later.
"""

COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=60 "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=180")


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for `devices` fake CPU devices with patient collectives."""
    return f"--xla_force_host_platform_device_count={devices} {COLLECTIVE_TIMEOUTS}"
