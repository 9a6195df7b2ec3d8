"""The one owner of a training run's directory layout (placeholder in this branch; see the merge)."""
