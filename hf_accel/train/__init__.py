"""Training harness shared by every trained method (``hf-accel train ...``).

* data.py: self-distilled training text: ShareGPT first user turns through the chat template, answered by the
  target itself (batched greedy generate), cached on disk per base model.
* loop.py: the fit loop: seeded batches, AdamW, progress bar, periodic held-out metrics, time budget,
  resumable checkpoints, the artifact written at the end.
* clover.py, hidden_transfer.py: each method's loss and held-out metrics (per-head top-1 agreement with the
  target).
"""
