"""Member metadata: where it lives, what it says, and the region state it persists.

``layout`` (where, pure), ``superblock`` (encoding and generations, pure), ``bitmap``
(sparse bitmap, pure), ``regions`` (write intent / out-of-sync / resync state machine,
pure) and ``store`` (the async shell that reads and writes one member's metadata).
"""
