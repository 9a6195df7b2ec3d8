"""Helpers shared by the tests."""

# XLA flags of every test process: cheaper compilation. The tests run tiny programs a few times, so compiling
# dominates their time; these flags do not change what a program computes beyond float reassociation.
CHEAP_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_devices(env_flags: str, count: int) -> str:
    """`env_flags` (an XLA_FLAGS value) plus `count` simulated host devices."""
    return f"{env_flags} --xla_force_host_platform_device_count={count}".strip()


def device_report(module: str, devices: int, timeout: int) -> dict:
    """Runs `python -m <module>` (a tests.helpers script printing one JSON line last) on `devices` simulated
    CPU devices with the cheap test flags; returns that JSON. Fails the test with the script's stderr."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, XLA_FLAGS=with_devices(CHEAP_XLA_FLAGS, devices), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", module], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
