"""The live kernel tracer: BCC-loaded probes on TCP connect (bpf/), an in-kernel endpoint
filter, and ECS documents enriched from /proc for the scorer."""

from tracer.probes import MODES, ProbeError
from tracer.session import Tracer

__all__ = ["MODES", "ProbeError", "Tracer"]
