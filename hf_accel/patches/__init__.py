"""Model-family quirks and attention-implementation switches: every piece of family-specific code in one folder.

* families.py: layer / norm / head access, logits post-processing, attention-mask layouts, shapes and config rules
  trained parts and draft models need, per family.
* attention.py: attention implementations a method supplies for its own requests (registered once with
  transformers, dispatched per thread: a forward of another request on the same model keeps its own implementation).
"""
