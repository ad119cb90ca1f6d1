"""imdswatch: live detection of unusual processes calling the cloud metadata service."""

__version__ = "0.1.0"
