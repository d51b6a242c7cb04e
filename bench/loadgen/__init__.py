"""`semipd bench`: a load generator for any OpenAI-compatible server, and the workload and report formats that
`semipd simulate` shares with it."""
