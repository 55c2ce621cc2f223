"""Defaults of the engine's knobs, plain numbers (no torch), so the serving configuration can name them."""

MAX_BATCH = 16  # the most requests generating together in a batch
PREFILL_CHUNK = 512  # the most prompt tokens a step prefills (a llama.cpp model's batch: its own passes cut there too)
RETRY_DOWN_AFTER_S = 5.0  # how long a drafter that stopped answering stays out of chains before it is tried again
DECODE_RUN_S = 0.1  # how long one call to the target may run plain decoding, one-token passes back to back
