"""Errors shared by the API, the VM configuration model and the runtime."""


class VmmError(Exception):
    """Base class of the monitor's own errors; the message is shown to the API client."""


class ConfigError(VmmError):
    """An invalid VM configuration value: a range, a missing file, a broken rule.

    The API returns it as 400 with the message as fault_message; the config file loader
    prints it and exits with status 1. The stored configuration is left unchanged.
    """


class StartError(VmmError):
    """InstanceStart failed: the runtime could not build or boot the VM.

    Raised by the runtime's start(); the API returns it as 400. The VM stays not started.
    """
