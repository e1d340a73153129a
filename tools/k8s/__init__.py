"""`rlhf k8s`: render, apply and inspect the Kubernetes deployment in deploy/k8s."""
