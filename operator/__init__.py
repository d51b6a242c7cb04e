"""semipd operator."""
