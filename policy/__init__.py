"""Enforcement policy: who may ask the metadata service for what (contract section 7).

A policy is a file the operator reviews and owns (`policy.toml_file`); it is learned from
the model (`policy.learn`) and checked against history before it is enforced
(`policy.plan`). Every decision goes through `policy.model.Policy.decide`."""
