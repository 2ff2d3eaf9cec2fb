"""Sending results back: the outbox queue in the ledger (outbox), C-STORE and storage commitment to one
destination (scu), and the sender thread of ``lungnode serve`` (sender).

The analysis side only calls ``enqueue_results`` once the outputs and their ``outputs.json`` exist.
"""

from node.send.outbox import enqueue_results

__all__ = ["enqueue_results"]
