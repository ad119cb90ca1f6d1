"""The live kernel tracer: BCC-loaded programs on TCP connects and requests (bpf/), an
in-kernel endpoint filter, and ECS documents enriched from /proc for the scorer."""
