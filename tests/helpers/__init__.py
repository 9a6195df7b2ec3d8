"""Helpers shared by the tests."""

# XLA flags of every test process: cheaper compilation. The tests run tiny programs a few times, so compiling
# dominates their time; these flags do not change what a program computes beyond float reassociation.
CHEAP_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_devices(env_flags: str, count: int) -> str:
    """`env_flags` (an XLA_FLAGS value) plus `count` simulated host devices."""
    return f"{env_flags} --xla_force_host_platform_device_count={count}".strip()
