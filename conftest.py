"""Test configuration shared by every suite: markers that skip with a reason, and figures.

Markers (see pyproject.toml):
- ``kvm``: needs a usable /dev/kvm.
- ``hardware_virt``: needs a host whose KVM runs guest code in hardware (VMX or
  SVM). On a host whose KVM emulates guest supervisor code, Linux user space
  cannot run in a guest, so these tests are skipped with that reason.

Tests record measured figures (boot times, exit counts, memory) with the
``figures`` fixture; they are printed at the end of the run and written to
``results/figures.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmm.arch.x86_64.emulation import HostKind, detect_host_kind

ROOT = Path(__file__).resolve().parent
FIGURES_PATH = ROOT / "results" / "figures.json"
_recorded_figures: dict[str, dict[str, object]] = {}


def kvm_unusable_reason() -> str | None:
    """Return why /dev/kvm cannot be used here, or None when it can."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as error:
        return f"/dev/kvm is not usable: {error.strerror}"
    os.close(fd)
    return None


HOST_KIND = detect_host_kind()
EMULATING_HOST_REASON = (
    "needs hardware virtualisation: this host's KVM emulates guest supervisor code (no "
    "VMX/SVM, e.g. kvm_pvm), so a guest's first system call faults (no Linux user space) "
    "and Firecracker's timing budgets do not apply"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kvm_reason = kvm_unusable_reason()
    for item in items:
        if kvm_reason and (
            item.get_closest_marker("kvm") or item.get_closest_marker("boot")
        ):
            item.add_marker(pytest.mark.skip(reason=kvm_reason))
        if item.get_closest_marker("hardware_virt") and HOST_KIND is HostKind.EMULATING:
            item.add_marker(pytest.mark.skip(reason=EMULATING_HOST_REASON))


@pytest.fixture
def figures(request: pytest.FixtureRequest):
    """Return a dict; what a test stores in it is reported under the test's name."""
    recorded: dict[str, object] = {"host": HOST_KIND.value}
    yield recorded
    _recorded_figures[request.node.nodeid] = recorded


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _recorded_figures:
        return
    terminalreporter.section("measured figures")
    for test, values in _recorded_figures.items():
        terminalreporter.write_line(test)
        for name, value in values.items():
            terminalreporter.write_line(f"    {name}: {value}")
    FIGURES_PATH.parent.mkdir(exist_ok=True)
    FIGURES_PATH.write_text(json.dumps(_recorded_figures, indent=2) + "\n")


# Hypothesis profiles for the fuzz suite: `quick` is the default (the whole tests/fuzz
# directory in under 3 minutes on 2 cores); `deep` runs thousands of examples per test
# (`pytest tests/fuzz --hypothesis-profile=deep`).
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "quick", max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep", max_examples=5000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("quick")

# Hypothesis imports libcst (through hypothesis.extra._patching) only when it reports a
# failing example, and libcst's import raises a DeprecationWarning from mypy_extensions that
# the warnings-as-errors setting turns into an INTERNALERROR hiding the failure. Importing
# it here, with that warning ignored, keeps failure reports readable.
import warnings  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass
