"""semipd policy: SLO observations in, SM splits and replica counts (with reasons) out. No torch, no Kubernetes."""
