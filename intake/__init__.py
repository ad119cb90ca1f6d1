"""Events in: NDJSON lines and ECS documents read into the Events the model scores, in
event-time order (the input pipeline `imdswatch replay` and the fleet scorer share)."""
