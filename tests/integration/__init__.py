"""Integration tests: real dst processes and real third-party NBD clients."""
