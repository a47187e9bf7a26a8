"""The `pml` console command: argument parsing on top of every package, calling their library functions."""
