"""lm-eval task YAMLs that read the shared evaluation data from local files, and their loaders."""
