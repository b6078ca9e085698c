"""Command-line entry points: thin click commands over library functions."""
