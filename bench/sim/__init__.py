"""`semipd simulate`: a discrete-event model of semipd pods (and of unified serving) running the real policy module.
Every figure it produces is simulated and says so."""
