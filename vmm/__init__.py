"""A microVM monitor for Linux KVM that speaks Firecracker's API."""

__version__ = "0.1.0"
