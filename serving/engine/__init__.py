"""The engine: requests, hypotheses and sequences, the scheduler, the KV block pool, the model
runner, decoding of each step and the outputs it returns."""
