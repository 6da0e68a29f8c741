"""XLA_FLAGS for tests that fake several CPU devices (import it from tests and the processes they start).

XLA:CPU aborts a program when one device's thread reaches a collective more than 40 s after another's. On a
loaded 2-core machine a device thread that is behind on earlier programs (programs without collectives let the
devices drift apart) can be that late, so tests allow 3 minutes. A true deadlock still aborts, later.

XLA:CPU (jaxlib 0.10.2) runs each device's program as a graph of thunks ordered by data dependencies only. With
its concurrency-optimized scheduler, a collective that does not depend on a loop holding collectives (the
sampler's gather of audio-slot indices beside the audio encoder's layer loop) was started first by one device
thread and after the loop by the other: each waited for the other at a different collective until the abort
(reproduced with the 2-device evaluation of tests/test_train.py). The default scheduler keeps them in one order.
Real accelerators run one ordered stream per device and are not affected.
"""

COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=60 "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=180")
ORDERED_COLLECTIVES = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for `devices` fake CPU devices with patient, consistently ordered collectives."""
    return f"--xla_force_host_platform_device_count={devices} {COLLECTIVE_TIMEOUTS} {ORDERED_COLLECTIVES}"
