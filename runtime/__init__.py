"""semipd runtime."""
