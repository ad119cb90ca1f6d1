"""The fleet transport: `imdswatch serve` (ingest API, write-ahead log, the fleet's one
model) and the agents' side of it (on-disk spool, sender, model fetch).

Scoring itself stays in `scoring/`: serve feeds `Scorer.process` through the same reorder
buffer replay uses, so the fleet scores exactly as `imdswatch replay` of the merged stream.
"""
