"""MLflow tracking across requeues, and run comparisons."""
