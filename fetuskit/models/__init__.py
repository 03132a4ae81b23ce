"""Model registry and network families."""
