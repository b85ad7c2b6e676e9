"""bootenv's benchmark harness (`make bench`). Never part of the timed test suite."""
