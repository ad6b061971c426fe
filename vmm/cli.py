"""The `vmm` command: Firecracker's command line, then the API server and the VM runtime.

Start-up is kept short: nothing on the path to the first accepted API connection imports
jsonschema or PyYAML (vmm.api.validation loads them later, on a background thread).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, NoReturn, Sequence

import vmm
from vmm import logger as vmm_logger
from vmm.controller import DEFAULT_INSTANCE_ID, Controller, Runtime
from vmm.errors import ConfigError
from vmm.metrics import Metrics
from vmm.resources import VmResources

log = logging.getLogger(__name__)

DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_MAX_PAYLOAD_SIZE = 51200
MAX_INSTANCE_ID_LENGTH = 64
EXIT_USAGE = 1
# Largest --config-file or --metadata file read; a stream such as /dev/zero stops here.
MAX_JSON_FILE_BYTES = 16 << 20

RuntimeFactory = Callable[..., Runtime]


class UsageError(Exception):
    """A bad flag, flag value or input file; main() prints it and exits with status 1."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as UsageError (exit status 1, not argparse's 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


_non_negative_int.__name__ = "non-negative integer"
_positive_int.__name__ = "positive integer"


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="vmm",
        description="A microVM monitor for Linux KVM with Firecracker's API and flags.",
    )
    add = parser.add_argument
    add("--api-sock", default=DEFAULT_API_SOCK, metavar="PATH",
        help=f"Unix socket path of the API server (default: {DEFAULT_API_SOCK})")
    add("--config-file", metavar="PATH",
        help="JSON file with the API bodies under kebab-case keys; the VM starts at once")
    add("--no-api", action="store_true",
        help="do not start the API server (needs --config-file)")
    add("--id", default=DEFAULT_INSTANCE_ID,
        help="instance id: 1-64 letters, digits or '-' (default: anonymous-instance)")

    add("--boot-timer", action="store_true",
        help="add the boot-timer device; the guest writing to it logs the boot time")

    add("--level", default=vmm_logger.DEFAULT_LEVEL,
        help="log level: Error, Warning, Info, Debug, Trace or Off (default: Info)")
    add("--log-path", metavar="PATH", help="file or named pipe for the log (default: stderr)")
    add("--show-level", action="store_true", help="write the level in each log line")
    add("--show-log-origin", action="store_true",
        help="write the source file and line in each log line")

    add("--metrics-path", metavar="PATH", help="file or named pipe for the JSON metrics")
    add("--metadata", metavar="PATH", help="JSON file with the initial MMDS contents")
    add("--http-api-max-payload-size", type=_positive_int, default=DEFAULT_MAX_PAYLOAD_SIZE,
        metavar="BYTES",
        help=f"largest API request body in bytes (default: {DEFAULT_MAX_PAYLOAD_SIZE})")
    add("--mmds-size-limit", type=_positive_int, metavar="BYTES",
        help="largest MMDS data store in bytes (default: the API payload limit)")

    add("--no-seccomp", action="store_true", help="do not install seccomp filters")
    add("--seccomp-filter", metavar="PATH", help="file with custom seccomp filters")
    add("--start-time-us", type=_non_negative_int, metavar="US",
        help="process start time in microseconds (CLOCK_MONOTONIC), set by the jailer")
    add("--start-time-cpu-us", type=_non_negative_int, metavar="US",
        help="process CPU time at start in microseconds, set by the jailer")
    add("--parent-cpu-time-us", type=_non_negative_int, metavar="US",
        help="CPU time of the parent (jailer) in microseconds")

    add("--describe-snapshot", metavar="PATH",
        help="print the format version of a snapshot file and exit")
    add("--version", action="store_true", help="print the version and exit")
    return parser


def check_instance_id(instance_id: str) -> None:
    """Raise UsageError unless the id is 1-64 ASCII letters, digits or hyphens."""
    if not 1 <= len(instance_id) <= MAX_INSTANCE_ID_LENGTH:
        raise UsageError(
            f"--id: length {len(instance_id)} is outside 1-{MAX_INSTANCE_ID_LENGTH}"
        )
    for position, char in enumerate(instance_id):
        if not (char == "-" or (char.isascii() and char.isalnum())):
            raise UsageError(
                f"--id: invalid character {char!r} at position {position}; "
                "use letters, digits and '-'"
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and cross-check the flags; raise UsageError naming the flag at fault."""
    args = build_parser().parse_args(argv)
    check_instance_id(args.id)
    if args.no_api and args.config_file is None:
        raise UsageError("--no-api needs --config-file: without the API the VM can only "
                         "be configured from a file")
    if args.no_seccomp and args.seccomp_filter is not None:
        raise UsageError("--no-seccomp and --seccomp-filter cannot be used together")
    if args.mmds_size_limit is None:
        args.mmds_size_limit = args.http_api_max_payload_size
    try:
        vmm_logger.parse_level(args.level)
    except ValueError as error:
        raise UsageError(f"--{error}") from None
    return args


def load_json_file(flag: str, path: str) -> Any:
    """Read a JSON file; raise UsageError naming the flag, the path and the problem."""
    try:
        with open(path, "rb") as json_file:
            data = json_file.read(MAX_JSON_FILE_BYTES + 1)
    except OSError as error:
        raise UsageError(f"{flag}: cannot read {path!r}: {error.strerror}") from None
    if len(data) > MAX_JSON_FILE_BYTES:
        raise UsageError(f"{flag}: {path!r} is larger than {MAX_JSON_FILE_BYTES} bytes")
    try:
        return json.loads(data)
    except ValueError as error:
        raise UsageError(f"{flag}: {path!r} is not valid JSON: {error}") from None
    except RecursionError:
        raise UsageError(f"{flag}: {path!r} nests JSON arrays or objects deeper than the "
                         "parser's recursion limit") from None


def _default_runtime_factory(**kwargs: Any) -> Runtime:
    from vmm.vm import MicroVm

    return MicroVm(**kwargs)


def main(argv: Sequence[str] | None = None,
         runtime_factory: RuntimeFactory | None = None) -> NoReturn:
    """Run the monitor until the VM ends, then exit with the runtime's exit code.

    `runtime_factory` builds the runtime from instance_id, boot_timer and metrics_path
    keywords; the default is vmm.vm.MicroVm.
    """
    try:
        sys.exit(_run(argv, runtime_factory or _default_runtime_factory))
    except (UsageError, ConfigError) as error:
        print(f"vmm: error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _run(argv: Sequence[str] | None, runtime_factory: RuntimeFactory) -> int:
    args = parse_args(argv)
    if args.version:
        print(f"vmm v{vmm.__version__}")
        return 0
    if args.describe_snapshot is not None:
        raise UsageError("--describe-snapshot: snapshot files are not supported by this "
                         "build")
    _configure_logging(args)
    config = None if args.config_file is None else load_json_file("--config-file",
                                                                  args.config_file)
    metadata = None if args.metadata is None else load_json_file("--metadata", args.metadata)
    _log_seccomp_state(args)

    try:
        runtime = runtime_factory(instance_id=args.id, boot_timer=args.boot_timer,
                                  metrics_path=args.metrics_path or None)
    except ValueError as error:  # the --metrics-path file cannot be opened
        raise UsageError(f"--metrics-path: {error}") from None
    controller = Controller(VmResources(), runtime, instance_id=args.id,
                            mmds_size_limit=args.mmds_size_limit,
                            metrics_path=args.metrics_path or None)
    if metadata is not None:
        _apply_metadata(controller, metadata)
    server = None if args.no_api else _start_api_server(args, controller)
    _register_startup_metrics(args, runtime)
    previous_handlers = _stop_on_signals(runtime)
    try:
        if config is not None:
            controller.apply_config(config)
            _start_from_config(controller)
        return runtime.wait()
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if server is not None:
            server.close()


def _stop_on_signals(runtime: Runtime) -> dict[int, Any]:
    """Make SIGINT and SIGTERM stop the VM with exit code 0; return the previous handlers.

    Outside the main thread (an in-process caller) Python cannot set handlers, so none are.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda _signum, _frame: runtime.shutdown(0))
    return previous


def _configure_logging(args: argparse.Namespace) -> None:
    try:
        vmm_logger.configure(args.id, level=args.level, log_path=args.log_path,
                             show_level=args.show_level, show_log_origin=args.show_log_origin)
    except ValueError as error:
        raise UsageError(f"--{error}") from None


def _log_seccomp_state(args: argparse.Namespace) -> None:
    if args.no_seccomp:
        return
    # NOTE: this build installs no seccomp filters, so the flag only changes this message.
    log.warning("seccomp filters are not supported by this build; the monitor runs "
                "without a system call filter%s",
                f" (ignoring --seccomp-filter {args.seccomp_filter})"
                if args.seccomp_filter else "")


def _apply_metadata(controller: Controller, metadata: Any) -> None:
    status, body = controller.handle("PUT", "/mmds", json.dumps(metadata).encode())
    if status >= 300:
        raise UsageError(f"--metadata: {body['fault_message'] if body else status}")


def _start_api_server(args: argparse.Namespace, controller: Controller) -> Any:
    from vmm.api.server import ApiServer, ApiServerError
    from vmm.api.validation import warm_up_in_background

    server = ApiServer(args.api_sock, controller.handle, args.http_api_max_payload_size)
    try:
        server.bind()
    except ApiServerError as error:
        raise UsageError(str(error)) from None
    server.start()
    log.info("API server ready on %s after %.1f ms of CPU time", args.api_sock,
             time.process_time() * 1000)
    if args.start_time_us is not None:
        # --start-time-us is a CLOCK_MONOTONIC reading, which time.monotonic_ns() also uses.
        elapsed_us = time.monotonic_ns() // 1000 - args.start_time_us
        log.info("API server ready %d us after --start-time-us", elapsed_us)
    warm_up_in_background()
    return server


def _register_startup_metrics(args: argparse.Namespace, runtime: Runtime) -> None:
    """Report the start-up times the jailer's flags allow in the api_server metrics group.

    process_startup_time_us is the CLOCK_MONOTONIC time since --start-time-us, and
    process_startup_time_cpu_us the CPU time since --start-time-cpu-us plus
    --parent-cpu-time-us. Without those flags both stay 0, as in Firecracker.
    """
    metrics = getattr(runtime, "metrics", None)
    if not isinstance(metrics, Metrics):
        return
    figures: dict[str, int] = {}
    if args.start_time_us is not None:
        figures["process_startup_time_us"] = time.monotonic_ns() // 1000 - args.start_time_us
    if args.start_time_cpu_us is not None:
        cpu_us = time.process_time_ns() // 1000 - args.start_time_cpu_us
        figures["process_startup_time_cpu_us"] = cpu_us + (args.parent_cpu_time_us or 0)
    metrics.register("api_server", lambda: figures)


def _start_from_config(controller: Controller) -> None:
    status, body = controller.start_instance()
    if status >= 300:
        raise ConfigError(f"InstanceStart failed: {body['fault_message'] if body else status}")
