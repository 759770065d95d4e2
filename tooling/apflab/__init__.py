"""apflab: integration tests for KVM asynchronous page faults.

The library is framework-free (no Avocado imports): Avocado tests and the
``apflab`` command line are thin layers over it.
"""

__version__ = "0.1.0"
