"""Pure functions and immutable values: no files, network, console, clock or global RNG."""
