"""The ``apflab`` command line: all argument parsing and printing; exit codes."""
