"""The project's own test suite and benchmarks: ``apflab check-functional``, ``apflab bench``."""
