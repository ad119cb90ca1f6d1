"""The lab: a private network namespace holding the metadata addresses (`lab.sandbox`), a
mock metadata service for every cloud inside it (`lab.mock_imds`) and the attack
simulations (`lab.attacks`), used by `imdswatch demo`, `imdswatch simulate`, the tests and
the benchmarks. Nothing here ever reaches a real metadata service."""
