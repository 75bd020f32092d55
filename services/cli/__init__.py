"""The frs command-line tool and the client library for upstream systems."""
