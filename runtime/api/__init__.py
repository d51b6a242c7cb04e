"""The HTTP API's pieces; runtime/server.py wires them into the app."""
